//! A small plant in memory for the rules' unit tests, and scans to apply to it.

use std::collections::{BTreeMap, HashMap};

use chrono::DateTime;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::{Applied, Kind, LotState, OperationState, ScanInput, WorkOrderState, World};

pub fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn op(step: i32, station: &str, status: &str) -> (i32, OperationState) {
    (
        step,
        OperationState {
            step,
            station: station.into(),
            status: status.into(),
            good: Decimal::ZERO,
            scrap: Decimal::ZERO,
        },
    )
}

fn order(number: &str, material: &str, status: &str, ops: &[(i32, &str, &str)]) -> WorkOrderState {
    WorkOrderState {
        number: number.into(),
        material: material.into(),
        status: status.into(),
        planned: dec("10"),
        produced: Decimal::ZERO,
        scrap: Decimal::ZERO,
        operations: ops
            .iter()
            .map(|(s, st, status)| op(*s, st, status))
            .collect::<BTreeMap<_, _>>(),
        components: HashMap::from([("STEEL".into(), dec("2")), ("BOLT".into(), dec("4"))]),
        dirty: false,
    }
}

pub fn lot(name: &str, material: &str, on_hand: &str, status: &str) -> LotState {
    LotState {
        lot: name.into(),
        material: material.into(),
        on_hand: dec(on_hand),
        status: status.into(),
        location: "RACK-1".into(),
        origin_kind: "received".into(),
        work_order: String::new(),
        is_new: false,
        dirty: false,
    }
}

fn produced(name: &str, material: &str, on_hand: &str, work_order: &str) -> LotState {
    LotState {
        origin_kind: "produced".into(),
        work_order: work_order.into(),
        ..lot(name, material, on_hand, "active")
    }
}

/// Stations ST-10/20/30. WO-1 makes FRAME (lots) in two steps, 10 at ST-10 and 20 at ST-20, from
/// STEEL and BOLT; WO-2 makes BIKE (serials) in step 10 at ST-30; WO-DONE is completed, WO-CLOSED
/// closed, WO-CANCELLED cancelled. Lots: STEEL-1 (100), STEEL-HOLD (on hold), BOLT-1 (1),
/// WHEEL-1 (not in any BOM), FRAME-1 (WO-1's output, 5), FRAME-9 (made by another order),
/// SN-1 (a BIKE serial).
pub fn plant() -> World {
    let released = [(10, "ST-10", "released"), (20, "ST-20", "released")];
    let done = [(10, "ST-10", "completed"), (20, "ST-20", "completed")];
    let orders = [
        order("WO-1", "FRAME", "released", &released),
        order("WO-2", "BIKE", "released", &[(10, "ST-30", "released")]),
        order("WO-DONE", "FRAME", "completed", &done),
        order("WO-CLOSED", "FRAME", "closed", &released),
        order("WO-CANCELLED", "FRAME", "cancelled", &released),
    ];
    let lots = [
        lot("STEEL-1", "STEEL", "100", "active"),
        lot("STEEL-HOLD", "STEEL", "100", "on_hold"),
        lot("BOLT-1", "BOLT", "1", "active"),
        lot("WHEEL-1", "WHEEL", "50", "active"),
        produced("FRAME-1", "FRAME", "5", "WO-1"),
        produced("FRAME-9", "FRAME", "5", "WO-9"),
        produced("SN-1", "BIKE", "1", "WO-2"),
    ];
    World {
        work_orders: orders.into_iter().map(|w| (w.number.clone(), w)).collect(),
        lots: lots.into_iter().map(|l| (l.lot.clone(), l)).collect(),
        materials: HashMap::from([
            ("FRAME".into(), "lot".into()),
            ("BIKE".into(), "serial".into()),
        ]),
        stations: ["ST-10", "ST-20", "ST-30"].map(String::from).into(),
    }
}

/// A scan of `kind` on WO-1 at ST-10 with no other field: tests fill in the kind's fields.
pub fn scan(kind: Kind) -> ScanInput {
    ScanInput {
        scan_id: Uuid::nil(),
        kind,
        work_order: "WO-1".into(),
        operation: 0,
        station: "ST-10".into(),
        lot: String::new(),
        material: String::new(),
        quantity: None,
        into_lot: String::new(),
        location: String::new(),
        result: None,
        defect_code: String::new(),
        scanned_at: DateTime::UNIX_EPOCH,
        attributes: String::new(),
    }
}

/// A scan of `kind` on `lot` with `quantity` (WO-1, ST-10).
pub fn lot_scan(kind: Kind, lot: &str, quantity: &str) -> ScanInput {
    let mut s = scan(kind);
    s.lot = lot.into();
    s.quantity = Some(dec(quantity));
    s
}

/// Applies `scan` to `world` (no device binding); panics with the rejection if there is one.
pub fn accept(world: &mut World, scan: &ScanInput) -> Applied {
    match world.apply(scan, None) {
        Ok(applied) => applied,
        Err(r) => panic!("rejected {}: {}", r.code, r.message),
    }
}

/// Asserts that `scan` is rejected by the plant with `code` and that nothing changed.
#[track_caller]
pub fn refused(scan: &ScanInput, code: &str) -> String {
    let mut world = plant();
    let r = world.apply(scan, None);
    assert_eq!(r.as_ref().map_err(|r| r.code), Err(code), "{scan:?}");
    assert_eq!(world, plant(), "a rejected scan changed the world");
    r.err().map(|r| r.message).unwrap_or_default()
}
