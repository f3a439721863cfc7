//! `produce`: a quantity of the work order's output, into a new lot or one the order produced
//! before; a serial is produced once, with quantity 1. Counts as good on the step and the order.

use rust_decimal::Decimal;

use mes_domain::scan::Produce;

use super::{Applied, Completed, LotState, Rejection, Rule, World, book, reject};

impl Rule for Produce {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let (wo, step) = book(
            &mut world.work_orders,
            &self.work_order,
            station,
            self.operation,
            Completed::Refused,
        )?;
        let output = wo.material.clone();
        if let Some(expected) = &self.material
            && *expected != output
        {
            return reject(
                "wrong_material",
                format!("work order {} produces {output}, not {expected}", wo.number),
            );
        }
        let serial = world.materials.get(&output).is_some_and(|t| t == "serial");
        if serial && self.quantity != Decimal::ONE {
            return reject("invalid_quantity", "a serial is produced with quantity 1");
        }
        if let Some(existing) = world.lots.get(&self.lot).filter(|l| l.exists()) {
            if serial {
                return reject(
                    "duplicate_serial",
                    format!("serial {} already exists", self.lot),
                );
            }
            if existing.material != output {
                return reject(
                    "wrong_material",
                    format!("lot {} is {}, not {output}", self.lot, existing.material),
                );
            }
            if existing.origin_kind != "produced" || existing.work_order != self.work_order {
                return reject(
                    "lot_exists",
                    format!("lot {} belongs to another origin", self.lot),
                );
            }
            if existing.status == "on_hold" {
                return reject("lot_on_hold", format!("lot {} is on hold", self.lot));
            }
        }
        let lot = world
            .lots
            .entry(self.lot.clone())
            .or_insert_with(|| LotState {
                lot: self.lot.clone(),
                material: output.clone(),
                on_hand: Decimal::ZERO,
                status: "active".into(),
                location: station.to_owned(),
                origin_kind: "produced".into(),
                work_order: self.work_order.clone(),
                is_new: true,
                dirty: false,
            });
        lot.material = output.clone();
        lot.origin_kind = "produced".into();
        lot.work_order = self.work_order.clone();
        if lot.location.is_empty() {
            lot.location = station.to_owned();
        }
        lot.on_hand += self.quantity;
        lot.status = "active".into();
        lot.dirty = true;
        wo.update_operation(step, |op| op.good += self.quantity);
        wo.produced += self.quantity;
        wo.dirty = true;
        wo.mark_started();
        Ok(Applied {
            material: output,
            operation: step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{accept, dec, lot, lot_scan, plant, refused};
    use super::super::{Kind, ScanInput};

    fn produce(work_order: &str, lot: &str, quantity: &str) -> ScanInput {
        let mut s = lot_scan(Kind::Produce, lot, quantity);
        s.work_order = work_order.into();
        if work_order == "WO-2" {
            s.station = "ST-30".into();
        }
        s
    }

    #[test]
    fn a_new_lot_holds_the_output_and_counts_as_good() {
        let mut world = plant();
        let applied = accept(&mut world, &produce("WO-1", "FRAME-2", "3"));
        assert_eq!(
            (applied.material.as_str(), applied.operation),
            ("FRAME", 10)
        );
        let lot = &world.lots["FRAME-2"];
        assert_eq!(
            (lot.material.as_str(), lot.on_hand, lot.location.as_str()),
            ("FRAME", dec("3"), "ST-10")
        );
        assert_eq!(
            (lot.origin_kind.as_str(), lot.work_order.as_str()),
            ("produced", "WO-1")
        );
        assert!(lot.is_new && lot.dirty);
        let wo = &world.work_orders["WO-1"];
        assert_eq!((wo.produced, wo.operations[&10].good), (dec("3"), dec("3")));
        assert_eq!((wo.status.as_str(), wo.dirty), ("in_progress", true));
        // The same lot again in the batch adds to it.
        accept(&mut world, &produce("WO-1", "FRAME-2", "2"));
        assert_eq!(world.lots["FRAME-2"].on_hand, dec("5"));
        assert_eq!(world.work_orders["WO-1"].produced, dec("5"));
    }

    #[test]
    fn adds_to_a_lot_the_order_produced_before() {
        let mut world = plant();
        accept(&mut world, &produce("WO-1", "FRAME-1", "1.5"));
        let lot = &world.lots["FRAME-1"];
        assert_eq!(
            (lot.on_hand, lot.location.as_str(), lot.is_new),
            (dec("6.5"), "RACK-1", false)
        );
    }

    #[test]
    fn a_serial_is_produced_once_with_quantity_one() {
        let mut world = plant();
        accept(&mut world, &produce("WO-2", "SN-2", "1"));
        assert_eq!(world.lots["SN-2"].material, "BIKE");
        let r = world
            .apply(&produce("WO-2", "SN-2", "1"), None)
            .unwrap_err();
        assert_eq!(
            (r.code, r.message.as_str()),
            ("duplicate_serial", "serial SN-2 already exists")
        );
        let m = refused(&produce("WO-2", "SN-3", "2"), "invalid_quantity");
        assert_eq!(m, "a serial is produced with quantity 1");
        refused(&produce("WO-2", "SN-1", "1"), "duplicate_serial");
    }

    #[test]
    fn rejections() {
        refused(&produce("WO-404", "FRAME-2", "1"), "unknown_work_order");
        refused(
            &produce("WO-CANCELLED", "FRAME-2", "1"),
            "work_order_closed",
        );
        refused(&produce("WO-DONE", "FRAME-2", "1"), "work_order_closed");
        let mut s = produce("WO-1", "FRAME-2", "1");
        s.operation = 20;
        refused(&s, "wrong_station");
        s.operation = 30;
        refused(&s, "invalid_operation");
        let mut s = produce("WO-1", "FRAME-2", "1");
        s.material = "BIKE".into();
        let m = refused(&s, "wrong_material");
        assert_eq!(m, "work order WO-1 produces FRAME, not BIKE");
        let m = refused(&produce("WO-1", "STEEL-1", "1"), "wrong_material");
        assert_eq!(m, "lot STEEL-1 is STEEL, not FRAME");
        let m = refused(&produce("WO-1", "FRAME-9", "1"), "lot_exists");
        assert_eq!(m, "lot FRAME-9 belongs to another origin");

        let mut world = plant();
        world.lots.get_mut("FRAME-1").unwrap().status = "on_hold".into();
        let before = world.clone();
        let r = world
            .apply(&produce("WO-1", "FRAME-1", "1"), None)
            .unwrap_err();
        assert_eq!(r.code, "lot_on_hold");
        assert_eq!(world, before);
        // A received lot of the output material is another origin too.
        world
            .lots
            .insert("FRAME-R".into(), lot("FRAME-R", "FRAME", "1", "active"));
        let r = world
            .apply(&produce("WO-1", "FRAME-R", "1"), None)
            .unwrap_err();
        assert_eq!(r.code, "lot_exists");
    }
}
