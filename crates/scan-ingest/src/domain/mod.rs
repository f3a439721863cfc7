//! The rules of the write path, free of transport and SQL: shape validation of a scan, and the
//! effect of each scan kind on the state it touches (work order, operation, lots).
//!
//! [`World`] holds the rows a batch touches, loaded and locked by the store; [`World::apply`]
//! either rejects a scan without changing anything or applies all of its effects.

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;

// The scan's kinds, its shape rules and its validated form are the contract's, shared with the
// gateway (mes-domain); what a valid scan does to the plant is this module's.
pub use mes_domain::scan::{MAX_BATCH, validate_batch};
pub use mes_domain::{InspectResult, ScanInput, ScanKind as Kind, parse_quantity};

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
