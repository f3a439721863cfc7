//! The rules of the write path, free of transport and SQL: shape validation of a scan, and the
//! effect of each scan kind on the state it touches (work order, operation, lots).
//!
//! [`World`] holds the rows a batch touches, loaded and locked by the store; [`World::apply`]
//! either rejects a scan without changing anything or applies all of its effects.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use mes_proto::v1 as pb;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::FieldViolation;

pub const MAX_BATCH: usize = 500;
const MAX_ID_LEN: usize = 128;
const MAX_ATTRIBUTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    StartOperation,
    Consume,
    Produce,
    CompleteOperation,
    Scrap,
    Move,
    Inspect,
    Void,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::StartOperation => "start_operation",
            Kind::Consume => "consume",
            Kind::Produce => "produce",
            Kind::CompleteOperation => "complete_operation",
            Kind::Scrap => "scrap",
            Kind::Move => "move",
            Kind::Inspect => "inspect",
            Kind::Void => "void",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "start_operation" => Kind::StartOperation,
            "consume" => Kind::Consume,
            "produce" => Kind::Produce,
            "complete_operation" => Kind::CompleteOperation,
            "scrap" => Kind::Scrap,
            "move" => Kind::Move,
            "inspect" => Kind::Inspect,
            "void" => Kind::Void,
            _ => return None,
        })
    }

    pub fn from_proto(k: i32) -> Option<Self> {
        Some(match pb::ScanKind::try_from(k).ok()? {
            pb::ScanKind::StartOperation => Kind::StartOperation,
            pb::ScanKind::Consume => Kind::Consume,
            pb::ScanKind::Produce => Kind::Produce,
            pb::ScanKind::CompleteOperation => Kind::CompleteOperation,
            pb::ScanKind::Scrap => Kind::Scrap,
            pb::ScanKind::Move => Kind::Move,
            pb::ScanKind::Inspect => Kind::Inspect,
            pb::ScanKind::Void => Kind::Void,
            pb::ScanKind::Unspecified => return None,
        })
    }

    pub fn to_proto(self) -> pb::ScanKind {
        match self {
            Kind::StartOperation => pb::ScanKind::StartOperation,
            Kind::Consume => pb::ScanKind::Consume,
            Kind::Produce => pb::ScanKind::Produce,
            Kind::CompleteOperation => pb::ScanKind::CompleteOperation,
            Kind::Scrap => pb::ScanKind::Scrap,
            Kind::Move => pb::ScanKind::Move,
            Kind::Inspect => pb::ScanKind::Inspect,
            Kind::Void => pb::ScanKind::Void,
        }
    }

    /// Kinds that name a lot.
    fn needs_lot(self) -> bool {
        matches!(
            self,
            Kind::Consume | Kind::Produce | Kind::Scrap | Kind::Move | Kind::Inspect
        )
    }

    fn needs_quantity(self) -> bool {
        matches!(
            self,
            Kind::Consume | Kind::Produce | Kind::Scrap | Kind::Move
        )
    }

    fn needs_operation(self) -> bool {
        matches!(self, Kind::StartOperation | Kind::CompleteOperation)
    }
}

/// A scan that passed shape validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanInput {
    pub scan_id: Uuid,
    pub kind: Kind,
    pub work_order: String,
    /// 0 when not given.
    pub operation: i32,
    pub station: String,
    pub lot: String,
    pub material: String,
    pub quantity: Option<Decimal>,
    pub into_lot: String,
    pub location: String,
    /// `pass`, `fail` or empty.
    pub result: String,
    pub defect_code: String,
    pub scanned_at: DateTime<Utc>,
    pub attributes: String,
}

impl ScanInput {
    /// A stable hash of the client-supplied content (idempotency: same id and hash = duplicate).
    pub fn content_hash(&self) -> String {
        let q = self
            .quantity
            .map(|q| q.normalize().to_string())
            .unwrap_or_default();
        let canonical = [
            self.scan_id.to_string(),
            self.kind.as_str().to_owned(),
            self.work_order.clone(),
            self.operation.to_string(),
            self.station.clone(),
            self.lot.clone(),
            self.material.clone(),
            q,
            self.into_lot.clone(),
            self.location.clone(),
            self.result.clone(),
            self.defect_code.clone(),
            self.scanned_at.timestamp_micros().to_string(),
            self.attributes.clone(),
        ];
        let mut h = Sha256::new();
        for part in canonical {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Parses a client decimal: `"12.5"`; positive, at most 6 decimals, below 10^12.
pub fn parse_quantity(s: &str) -> Result<Decimal, &'static str> {
    let t = s.trim();
    if t.is_empty() || t != s {
        return Err("must be a decimal string such as \"12.5\"");
    }
    if !t.chars().all(|c| c.is_ascii_digit() || c == '.') || t.starts_with('.') || t.ends_with('.')
    {
        return Err("must be a decimal string such as \"12.5\"");
    }
    let d: Decimal = t
        .parse()
        .map_err(|_| "must be a decimal string such as \"12.5\"")?;
    if d <= Decimal::ZERO {
        return Err("must be greater than zero");
    }
    if d.scale() > 6 {
        return Err("must have at most 6 decimal places");
    }
    if d >= Decimal::from(1_000_000_000_000i64) {
        return Err("is too large");
    }
    Ok(d)
}

fn check_id(violations: &mut Vec<FieldViolation>, field: String, value: &str, required: bool) {
    if value.is_empty() {
        if required {
            violations.push(FieldViolation::new(field, "is required"));
        }
    } else if value.len() > MAX_ID_LEN {
        violations.push(FieldViolation::new(
            field,
            format!("must be at most {MAX_ID_LEN} characters"),
        ));
    } else if value.chars().any(|c| c.is_control()) || value.trim() != value {
        violations.push(FieldViolation::new(
            field,
            "must not contain control characters or surrounding spaces",
        ));
    }
}

/// Validates the shape of every scan of a batch; field names are `scans[i].<field>`.
pub fn validate_batch(
    scans: &[pb::Scan],
    now: DateTime<Utc>,
) -> Result<Vec<ScanInput>, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if scans.is_empty() {
        violations.push(FieldViolation::new(
            "scans",
            "must contain at least one scan",
        ));
    }
    if scans.len() > MAX_BATCH {
        violations.push(FieldViolation::new(
            "scans",
            format!("must contain at most {MAX_BATCH} scans"),
        ));
        return Err(violations);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(scans.len());
    for (i, s) in scans.iter().enumerate() {
        let f = |name: &str| format!("scans[{i}].{name}");
        let before = violations.len();
        let scan_id = match Uuid::parse_str(&s.scan_id) {
            Ok(id) if !id.is_nil() => {
                if !seen.insert(id) {
                    violations.push(FieldViolation::new(
                        f("scan_id"),
                        "appears twice in the batch",
                    ));
                }
                id
            }
            _ => {
                violations.push(FieldViolation::new(f("scan_id"), "must be a UUID"));
                Uuid::nil()
            }
        };
        let kind = match Kind::from_proto(s.kind) {
            Some(Kind::Void) => {
                violations.push(FieldViolation::new(
                    f("kind"),
                    "void scans are created by the void operation",
                ));
                Kind::Void
            }
            Some(k) => k,
            None => {
                violations.push(FieldViolation::new(
                    f("kind"),
                    "must be one of start_operation, consume, produce, complete_operation, scrap, move, inspect",
                ));
                Kind::Void
            }
        };
        check_id(
            &mut violations,
            f("work_order"),
            &s.work_order,
            kind != Kind::Move,
        );
        check_id(&mut violations, f("station"), &s.station, true);
        check_id(&mut violations, f("lot"), &s.lot, kind.needs_lot());
        check_id(&mut violations, f("material"), &s.material, false);
        check_id(&mut violations, f("into_lot"), &s.into_lot, false);
        check_id(
            &mut violations,
            f("location"),
            &s.location,
            kind == Kind::Move,
        );
        check_id(&mut violations, f("defect_code"), &s.defect_code, false);
        if kind.needs_operation() && s.operation == 0 {
            violations.push(FieldViolation::new(f("operation"), "is required"));
        }
        if s.operation > 1_000_000 {
            violations.push(FieldViolation::new(f("operation"), "is out of range"));
        }
        let quantity = if s.quantity.is_empty() {
            if kind.needs_quantity() {
                violations.push(FieldViolation::new(f("quantity"), "is required"));
            }
            None
        } else {
            match parse_quantity(&s.quantity) {
                Ok(q) => Some(q),
                Err(m) => {
                    violations.push(FieldViolation::new(f("quantity"), m));
                    None
                }
            }
        };
        if !s.into_lot.is_empty() && kind != Kind::Consume {
            violations.push(FieldViolation::new(
                f("into_lot"),
                "is only allowed on consume",
            ));
        }
        let result =
            match pb::InspectResult::try_from(s.result).unwrap_or(pb::InspectResult::Unspecified) {
                pb::InspectResult::Pass => "pass",
                pb::InspectResult::Fail => "fail",
                pb::InspectResult::Unspecified => "",
            };
        if kind == Kind::Inspect && result.is_empty() {
            violations.push(FieldViolation::new(f("result"), "must be pass or fail"));
        }
        if kind != Kind::Inspect && !result.is_empty() {
            violations.push(FieldViolation::new(
                f("result"),
                "is only allowed on inspect",
            ));
        }
        if s.defect_code.is_empty()
            && (kind == Kind::Scrap || (kind == Kind::Inspect && result == "fail"))
        {
            violations.push(FieldViolation::new(
                f("defect_code"),
                "is required for scrap and failed inspections",
            ));
        }
        let scanned_at = match &s.scanned_at {
            Some(ts) => match DateTime::<Utc>::from_timestamp(
                ts.seconds,
                ts.nanos.clamp(0, 999_999_999) as u32,
            ) {
                Some(t)
                    if t <= now + chrono::Duration::hours(24) && t.timestamp() > 946_684_800 =>
                {
                    t
                }
                _ => {
                    violations.push(FieldViolation::new(
                        f("scanned_at"),
                        "must be a time between 2000 and one day from now",
                    ));
                    now
                }
            },
            None => {
                violations.push(FieldViolation::new(f("scanned_at"), "is required"));
                now
            }
        };
        if s.attributes_json.len() > MAX_ATTRIBUTES {
            violations.push(FieldViolation::new(
                f("attributes"),
                "must be at most 4 KiB serialised",
            ));
        } else if !s.attributes_json.is_empty()
            && !serde_json::from_str::<serde_json::Value>(&s.attributes_json)
                .is_ok_and(|v| v.is_object())
        {
            violations.push(FieldViolation::new(
                f("attributes"),
                "must be a JSON object",
            ));
        }
        if violations.len() == before {
            out.push(ScanInput {
                scan_id,
                kind,
                work_order: s.work_order.clone(),
                operation: s.operation as i32,
                station: s.station.clone(),
                lot: s.lot.clone(),
                material: s.material.clone(),
                quantity,
                into_lot: s.into_lot.clone(),
                location: s.location.clone(),
                result: result.to_owned(),
                defect_code: s.defect_code.clone(),
                scanned_at,
                attributes: s.attributes_json.clone(),
            });
        }
    }
    if violations.is_empty() {
        Ok(out)
    } else {
        Err(violations)
    }
}

/// A business rejection: the scan is valid but cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
}

fn reject<T>(code: &'static str, message: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection {
        code,
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct OperationState {
    pub step: i32,
    pub station: String,
    pub status: String,
    pub good: Decimal,
    pub scrap: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkOrderState {
    pub number: String,
    pub material: String,
    pub status: String,
    pub planned: Decimal,
    pub produced: Decimal,
    pub scrap: Decimal,
    pub operations: BTreeMap<i32, OperationState>,
    pub components: HashMap<String, Decimal>,
    pub dirty: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LotState {
    pub lot: String,
    pub material: String,
    pub on_hand: Decimal,
    pub status: String,
    pub location: String,
    pub origin_kind: String,
    pub work_order: String,
    pub is_new: bool,
    pub dirty: bool,
}

/// The rows a batch touches (locked by the store for the transaction).
#[derive(Debug, Default)]
pub struct World {
    pub work_orders: HashMap<String, WorkOrderState>,
    pub lots: HashMap<String, LotState>,
    /// material number → tracking (`lot` | `serial`).
    pub materials: HashMap<String, String>,
    pub stations: HashSet<String>,
}

/// What an accepted scan resolved (stored with it and published in its event).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// The material of the scan's lot (or the order's output material).
    pub material: String,
    /// The routing step the scan was booked on (resolved from the station when not given).
    pub operation: i32,
}

impl World {
    /// Applies `scan` made by a caller bound to `caller_station` (if any): all effects, or none.
    pub fn apply(
        &mut self,
        scan: &ScanInput,
        caller_station: Option<&str>,
    ) -> Result<Applied, Rejection> {
        if let Some(bound) = caller_station
            && bound != scan.station
        {
            return reject(
                "wrong_station",
                format!("this device is bound to station {bound}"),
            );
        }
        if !self.stations.contains(&scan.station) {
            return reject(
                "unknown_station",
                format!("station {} does not exist", scan.station),
            );
        }
        // Work order and operation checks (no mutation yet).
        let step = if scan.work_order.is_empty() {
            None
        } else {
            let Some(wo) = self.work_orders.get(&scan.work_order) else {
                return reject(
                    "unknown_work_order",
                    format!("work order {} does not exist", scan.work_order),
                );
            };
            if matches!(wo.status.as_str(), "closed" | "cancelled") {
                return reject(
                    "work_order_closed",
                    format!("work order {} is {}", wo.number, wo.status),
                );
            }
            if wo.status == "completed" && !matches!(scan.kind, Kind::Inspect | Kind::Move) {
                return reject(
                    "work_order_closed",
                    format!("work order {} is completed", wo.number),
                );
            }
            Some(resolve_operation(wo, scan)?)
        };

        let outcome = match scan.kind {
            Kind::StartOperation => {
                let op = &self.work_orders[&scan.work_order].operations[&step.unwrap_or_default()];
                if op.status == "completed" {
                    return reject(
                        "invalid_operation",
                        format!("operation {} is already completed", op.step),
                    );
                }
                let wo = self.with_op(scan, step, |op| op.status = "in_progress".into());
                wo.dirty = true;
                mark_started(wo);
                Ok(Applied {
                    material: wo.material.clone(),
                    operation: 0,
                })
            }
            Kind::CompleteOperation => {
                let op = &self.work_orders[&scan.work_order].operations[&step.unwrap_or_default()];
                if op.status == "completed" {
                    return reject(
                        "invalid_operation",
                        format!("operation {} is already completed", op.step),
                    );
                }
                let wo = self.with_op(scan, step, |op| op.status = "completed".into());
                wo.dirty = true;
                mark_started(wo);
                if wo.operations.values().all(|o| o.status == "completed") {
                    wo.status = "completed".into();
                }
                Ok(Applied {
                    material: wo.material.clone(),
                    operation: 0,
                })
            }
            Kind::Consume => {
                let q = scan.quantity.unwrap_or_default();
                let lot = self.usable_lot(&scan.lot)?;
                if !scan.material.is_empty() && scan.material != lot.material {
                    return reject(
                        "wrong_material",
                        format!("lot {} is {}, not {}", lot.lot, lot.material, scan.material),
                    );
                }
                let wo = &self.work_orders[&scan.work_order];
                if !wo.components.contains_key(&lot.material) {
                    return reject(
                        "not_in_bom",
                        format!(
                            "{} is not a component of work order {}",
                            lot.material, wo.number
                        ),
                    );
                }
                if lot.on_hand < q {
                    return reject(
                        "insufficient_quantity",
                        format!(
                            "lot {} has {} on hand, {} requested",
                            lot.lot, lot.on_hand, q
                        ),
                    );
                }
                if let Some(target) = self.lots.get(&scan.into_lot)
                    && target.material != wo.material
                {
                    return reject(
                        "wrong_material",
                        format!(
                            "into_lot {} is not an output of work order {}",
                            scan.into_lot, wo.number
                        ),
                    );
                }
                let material = lot.material.clone();
                let lot = self.lots.get_mut(&scan.lot).expect("checked above");
                lot.on_hand -= q;
                if lot.on_hand.is_zero() {
                    lot.status = "consumed".into();
                }
                lot.dirty = true;
                let wo = self.with_op(scan, step, |_| {});
                mark_started(wo);
                Ok(Applied {
                    material,
                    operation: 0,
                })
            }
            Kind::Produce => {
                let q = scan.quantity.unwrap_or_default();
                let wo = &self.work_orders[&scan.work_order];
                let output = wo.material.clone();
                if !scan.material.is_empty() && scan.material != output {
                    return reject(
                        "wrong_material",
                        format!(
                            "work order {} produces {}, not {}",
                            wo.number, output, scan.material
                        ),
                    );
                }
                let serial = self.materials.get(&output).is_some_and(|t| t == "serial");
                if serial && q != Decimal::ONE {
                    return reject("invalid_quantity", "a serial is produced with quantity 1");
                }
                match self.lots.get(&scan.lot) {
                    Some(existing) if !existing.is_new || existing.dirty => {
                        if serial {
                            return reject(
                                "duplicate_serial",
                                format!("serial {} already exists", scan.lot),
                            );
                        }
                        if existing.material != output {
                            return reject(
                                "wrong_material",
                                format!(
                                    "lot {} is {}, not {}",
                                    scan.lot, existing.material, output
                                ),
                            );
                        }
                        if existing.origin_kind != "produced"
                            || existing.work_order != scan.work_order
                        {
                            return reject(
                                "lot_exists",
                                format!("lot {} belongs to another origin", scan.lot),
                            );
                        }
                        if existing.status == "on_hold" {
                            return reject("lot_on_hold", format!("lot {} is on hold", scan.lot));
                        }
                    }
                    _ => {}
                }
                let lot = self
                    .lots
                    .entry(scan.lot.clone())
                    .or_insert_with(|| LotState {
                        lot: scan.lot.clone(),
                        material: output.clone(),
                        on_hand: Decimal::ZERO,
                        status: "active".into(),
                        location: scan.station.clone(),
                        origin_kind: "produced".into(),
                        work_order: scan.work_order.clone(),
                        is_new: true,
                        dirty: false,
                    });
                lot.material = output.clone();
                lot.origin_kind = "produced".into();
                lot.work_order = scan.work_order.clone();
                if lot.location.is_empty() {
                    lot.location = scan.station.clone();
                }
                lot.on_hand += q;
                lot.status = "active".into();
                lot.dirty = true;
                let wo = self.with_op(scan, step, |op| op.good += q);
                wo.produced += q;
                wo.dirty = true;
                mark_started(wo);
                Ok(Applied {
                    material: output,
                    operation: 0,
                })
            }
            Kind::Scrap => {
                let q = scan.quantity.unwrap_or_default();
                let lot = self.usable_lot(&scan.lot)?;
                if lot.on_hand < q {
                    return reject(
                        "insufficient_quantity",
                        format!(
                            "lot {} has {} on hand, {} to scrap",
                            lot.lot, lot.on_hand, q
                        ),
                    );
                }
                let material = lot.material.clone();
                let lot = self.lots.get_mut(&scan.lot).expect("checked above");
                lot.on_hand -= q;
                if lot.on_hand.is_zero() {
                    lot.status = "scrapped".into();
                }
                lot.dirty = true;
                let wo = self.with_op(scan, step, |op| op.scrap += q);
                wo.scrap += q;
                wo.dirty = true;
                mark_started(wo);
                Ok(Applied {
                    material,
                    operation: 0,
                })
            }
            Kind::Move => {
                let q = scan.quantity.unwrap_or_default();
                let lot = self.usable_lot(&scan.lot)?;
                if lot.on_hand < q {
                    return reject(
                        "insufficient_quantity",
                        format!("lot {} has {} on hand, {} to move", lot.lot, lot.on_hand, q),
                    );
                }
                let material = lot.material.clone();
                let lot = self.lots.get_mut(&scan.lot).expect("checked above");
                lot.location = scan.location.clone();
                lot.dirty = true;
                if step.is_some() {
                    mark_started(self.with_op(scan, step, |_| {}));
                }
                Ok(Applied {
                    material,
                    operation: 0,
                })
            }
            Kind::Inspect => {
                let Some(lot) = self.lots.get(&scan.lot).filter(|l| !l.is_new || l.dirty) else {
                    return reject("unknown_lot", format!("lot {} does not exist", scan.lot));
                };
                let material = lot.material.clone();
                if step.is_some() {
                    mark_started(self.with_op(scan, step, |_| {}));
                }
                Ok(Applied {
                    material,
                    operation: 0,
                })
            }
            Kind::Void => reject(
                "invalid_kind",
                "void scans are created by the void operation",
            ),
        };
        outcome.map(|a| Applied {
            operation: step.unwrap_or(scan.operation),
            ..a
        })
    }

    fn usable_lot(&self, lot: &str) -> Result<&LotState, Rejection> {
        let Some(l) = self.lots.get(lot).filter(|l| !l.is_new || l.dirty) else {
            return reject("unknown_lot", format!("lot {lot} does not exist"));
        };
        if l.status == "on_hold" {
            return reject("lot_on_hold", format!("lot {lot} is on hold"));
        }
        Ok(l)
    }

    /// The scan's work order, after `f` changed the scan's operation.
    fn with_op(
        &mut self,
        scan: &ScanInput,
        step: Option<i32>,
        f: impl FnOnce(&mut OperationState),
    ) -> &mut WorkOrderState {
        let wo = self
            .work_orders
            .get_mut(&scan.work_order)
            .expect("work order checked before");
        if let Some(op) = step.and_then(|s| wo.operations.get_mut(&s)) {
            f(op);
        }
        wo
    }
}

fn mark_started(wo: &mut WorkOrderState) {
    if wo.status == "released" {
        wo.status = "in_progress".into();
        wo.dirty = true;
    }
}

/// The routing step a scan belongs to: the named one (which must run at the scan's station),
/// or the order's operation at that station.
fn resolve_operation(wo: &WorkOrderState, scan: &ScanInput) -> Result<i32, Rejection> {
    if scan.operation != 0 {
        let Some(op) = wo.operations.get(&scan.operation) else {
            return reject(
                "invalid_operation",
                format!(
                    "work order {} has no operation {}",
                    wo.number, scan.operation
                ),
            );
        };
        if op.station != scan.station {
            return reject(
                "wrong_station",
                format!(
                    "operation {} runs at {}, not {}",
                    op.step, op.station, scan.station
                ),
            );
        }
        return Ok(op.step);
    }
    // Prefer an unfinished operation at this station, else the last one there.
    let at_station: Vec<&OperationState> = wo
        .operations
        .values()
        .filter(|o| o.station == scan.station)
        .collect();
    match at_station
        .iter()
        .find(|o| o.status != "completed")
        .or(at_station.last())
    {
        Some(op) => Ok(op.step),
        None => reject(
            "wrong_station",
            format!(
                "work order {} has no operation at {}",
                wo.number, scan.station
            ),
        ),
    }
}
