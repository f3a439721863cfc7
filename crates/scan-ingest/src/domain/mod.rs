//! The rules of the write path, free of transport and SQL: what each scan kind does to the work
//! order, the routing step and the lots it touches.
//!
//! [`World`] holds the rows a batch touches, loaded and locked by the store; [`World::apply`]
//! either rejects a scan without changing anything or applies all of its effects. It checks what
//! every scan shares (the station), then hands the scan's [`ScanCommand`] to its kind's module
//! (`start`, `consume`, `produce`, `complete`, `scrap`, `moves`, `inspect`), all of one shape:
//! `impl Rule for <Kind>` (the kind's checks, in the order a client reads its rejections, then
//! its effects) with its unit tests beside it. The checks the kinds share (the work order open
//! for the scan, its routing step, a usable lot) are below.

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;

// The scan's kinds, its shape rules and its validated form are the contract's, shared with the
// gateway (mes-domain); what a valid scan does to the plant is this module's.
pub use mes_domain::scan::{MAX_BATCH, ScanCommand, validate_batch};
pub use mes_domain::{InspectResult, ScanInput, ScanKind as Kind, parse_quantity};

mod complete;
mod consume;
mod inspect;
mod moves;
mod produce;
mod scrap;
mod start;

#[cfg(test)]
mod fixture;

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
#[derive(Debug, Default, Clone, PartialEq)]
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

/// One scan kind's rule: its checks, then its effects on `world`, for a scan made at `station`
/// (a station that exists). A rejection leaves `world` as it was.
trait Rule {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection>;
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
        let Some(command) = scan.command() else {
            // Never a scan validate_batch let through: a void, or one built without its fields.
            return match scan.kind {
                Kind::Void => reject(
                    "invalid_kind",
                    "void scans are created by the void operation",
                ),
                kind => reject(
                    "invalid_kind",
                    format!(
                        "this {} scan lacks a field its kind requires",
                        kind.as_str()
                    ),
                ),
            };
        };
        let station = scan.station.as_str();
        match &command {
            ScanCommand::Start(c) => c.apply(self, station),
            ScanCommand::Consume(c) => c.apply(self, station),
            ScanCommand::Produce(c) => c.apply(self, station),
            ScanCommand::Complete(c) => c.apply(self, station),
            ScanCommand::Scrap(c) => c.apply(self, station),
            ScanCommand::Move(c) => c.apply(self, station),
            ScanCommand::Inspect(c) => c.apply(self, station),
        }
    }
}

impl WorkOrderState {
    /// The first scan of any kind starts a released order.
    fn mark_started(&mut self) {
        if self.status == "released" {
            self.status = "in_progress".into();
            self.dirty = true;
        }
    }

    /// Changes routing step `step` (one [`resolve_operation`] found on this order).
    fn update_operation(&mut self, step: i32, f: impl FnOnce(&mut OperationState)) {
        if let Some(op) = self.operations.get_mut(&step) {
            f(op);
        }
    }
}

impl LotState {
    /// Whether the lot exists (loaded from the database, or produced earlier in this batch).
    fn exists(&self) -> bool {
        !self.is_new || self.dirty
    }
}

/// Whether a kind still books on a work order its last operation completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completed {
    /// Only moving and inspecting what the order made.
    Accepted,
    Refused,
}

/// The work order a scan books on, if it is open for it.
fn open_order<'w>(
    work_orders: &'w mut HashMap<String, WorkOrderState>,
    number: &str,
    completed: Completed,
) -> Result<&'w mut WorkOrderState, Rejection> {
    let Some(wo) = work_orders.get_mut(number) else {
        return reject(
            "unknown_work_order",
            format!("work order {number} does not exist"),
        );
    };
    if matches!(wo.status.as_str(), "closed" | "cancelled") {
        return reject(
            "work_order_closed",
            format!("work order {} is {}", wo.number, wo.status),
        );
    }
    if wo.status == "completed" && completed == Completed::Refused {
        return reject(
            "work_order_closed",
            format!("work order {} is completed", wo.number),
        );
    }
    Ok(wo)
}

/// The open work order a scan books on and the routing step it resolves to.
fn book<'w>(
    work_orders: &'w mut HashMap<String, WorkOrderState>,
    number: &str,
    station: &str,
    operation: Option<i32>,
    completed: Completed,
) -> Result<(&'w mut WorkOrderState, i32), Rejection> {
    let wo = open_order(work_orders, number, completed)?;
    let step = resolve_operation(wo, station, operation)?.step;
    Ok((wo, step))
}

/// The routing step a scan belongs to: the named one (which must run at the scan's station),
/// or the order's operation at that station.
fn resolve_operation<'w>(
    wo: &'w WorkOrderState,
    station: &str,
    operation: Option<i32>,
) -> Result<&'w OperationState, Rejection> {
    if let Some(step) = operation {
        let Some(op) = wo.operations.get(&step) else {
            return reject(
                "invalid_operation",
                format!("work order {} has no operation {step}", wo.number),
            );
        };
        if op.station != station {
            return reject(
                "wrong_station",
                format!(
                    "operation {} runs at {}, not {station}",
                    op.step, op.station
                ),
            );
        }
        return Ok(op);
    }
    // Prefer an unfinished operation at this station, else the last one there.
    let at_station: Vec<&OperationState> = wo
        .operations
        .values()
        .filter(|o| o.station == station)
        .collect();
    match at_station
        .iter()
        .find(|o| o.status != "completed")
        .or(at_station.last())
    {
        Some(op) => Ok(op),
        None => reject(
            "wrong_station",
            format!("work order {} has no operation at {station}", wo.number),
        ),
    }
}

/// The named routing step, if it is not completed yet (starting and completing it).
fn unfinished_step(wo: &WorkOrderState, station: &str, operation: i32) -> Result<i32, Rejection> {
    let op = resolve_operation(wo, station, Some(operation))?;
    if op.status == "completed" {
        return reject(
            "invalid_operation",
            format!("operation {} is already completed", op.step),
        );
    }
    Ok(op.step)
}

/// A lot a scan takes from: it exists and is not on hold.
fn usable_lot<'w>(
    lots: &'w mut HashMap<String, LotState>,
    lot: &str,
) -> Result<&'w mut LotState, Rejection> {
    let Some(l) = lots.get_mut(lot).filter(|l| l.exists()) else {
        return reject("unknown_lot", format!("lot {lot} does not exist"));
    };
    if l.status == "on_hold" {
        return reject("lot_on_hold", format!("lot {lot} is on hold"));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::fixture::{accept, lot_scan, plant, refused, scan};
    use super::*;

    fn consume() -> ScanInput {
        lot_scan(Kind::Consume, "STEEL-1", "1")
    }

    #[test]
    fn a_device_bound_to_a_station_scans_there_only() {
        let mut world = plant();
        let r = world.apply(&consume(), Some("ST-20")).unwrap_err();
        assert_eq!(
            (r.code, r.message.as_str()),
            ("wrong_station", "this device is bound to station ST-20")
        );
        assert_eq!(world, plant());
        assert!(world.apply(&consume(), Some("ST-10")).is_ok());
    }

    #[test]
    fn the_station_must_exist() {
        let mut s = consume();
        s.station = "ST-99".into();
        let m = refused(&s, "unknown_station");
        assert_eq!(m, "station ST-99 does not exist");
    }

    #[test]
    fn a_scan_that_is_no_command_is_refused() {
        let m = refused(&scan(Kind::Void), "invalid_kind");
        assert_eq!(m, "void scans are created by the void operation");
        let mut s = consume();
        s.quantity = None;
        refused(&s, "invalid_kind");
    }

    #[test]
    fn the_step_is_the_unfinished_one_at_the_station_else_the_last_there() {
        let mut world = plant();
        let wo = world.work_orders.get_mut("WO-1").unwrap();
        let mut thirty = wo.operations[&10].clone();
        thirty.step = 30;
        wo.operations.insert(30, thirty);
        assert_eq!(accept(&mut world, &consume()).operation, 10);
        let mut complete = scan(Kind::CompleteOperation);
        complete.operation = 10;
        accept(&mut world, &complete);
        assert_eq!(accept(&mut world, &consume()).operation, 30);
        complete.operation = 30;
        accept(&mut world, &complete);
        assert_eq!(world.work_orders["WO-1"].status, "in_progress");
        assert_eq!(accept(&mut world, &consume()).operation, 30);
    }
}
