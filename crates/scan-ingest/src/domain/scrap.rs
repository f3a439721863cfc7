//! `scrap`: a quantity of a lot is scrapped on a work order (the lot is `scrapped` when nothing
//! is left of it); counts as scrap on the step and the order.

use mes_domain::scan::Scrap;

use super::{Applied, Completed, Rejection, Rule, World, book, reject, usable_lot};

impl Rule for Scrap {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let (wo, step) = book(
            &mut world.work_orders,
            &self.work_order,
            station,
            self.operation,
            Completed::Refused,
        )?;
        let lot = usable_lot(&mut world.lots, &self.lot)?;
        if lot.on_hand < self.quantity {
            return reject(
                "insufficient_quantity",
                format!(
                    "lot {} has {} on hand, {} to scrap",
                    lot.lot, lot.on_hand, self.quantity
                ),
            );
        }
        lot.on_hand -= self.quantity;
        if lot.on_hand.is_zero() {
            lot.status = "scrapped".into();
        }
        lot.dirty = true;
        wo.update_operation(step, |op| op.scrap += self.quantity);
        wo.scrap += self.quantity;
        wo.dirty = true;
        wo.mark_started();
        Ok(Applied {
            material: lot.material.clone(),
            operation: step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{accept, dec, lot_scan, plant, refused};
    use super::super::{Kind, ScanInput};

    fn scrap(lot: &str, quantity: &str) -> ScanInput {
        let mut s = lot_scan(Kind::Scrap, lot, quantity);
        s.defect_code = "CRACK".into();
        s
    }

    #[test]
    fn takes_from_the_lot_and_counts_as_scrap() {
        let mut world = plant();
        let mut s = scrap("FRAME-1", "2");
        s.station = "ST-20".into();
        let applied = accept(&mut world, &s);
        assert_eq!(
            (applied.material.as_str(), applied.operation),
            ("FRAME", 20)
        );
        let lot = &world.lots["FRAME-1"];
        assert_eq!(
            (lot.on_hand, lot.status.as_str(), lot.dirty),
            (dec("3"), "active", true)
        );
        let wo = &world.work_orders["WO-1"];
        assert_eq!(
            (wo.scrap, wo.operations[&20].scrap, wo.operations[&10].scrap),
            (dec("2"), dec("2"), dec("0"))
        );
        assert_eq!((wo.status.as_str(), wo.dirty), ("in_progress", true));
        accept(&mut world, &scrap("FRAME-1", "3"));
        assert_eq!(world.lots["FRAME-1"].status, "scrapped");
        assert_eq!(world.work_orders["WO-1"].scrap, dec("5"));
    }

    #[test]
    fn rejections() {
        let mut s = scrap("STEEL-1", "1");
        s.work_order = "WO-404".into();
        refused(&s, "unknown_work_order");
        s.work_order = "WO-CLOSED".into();
        refused(&s, "work_order_closed");
        s.work_order = "WO-1".into();
        s.operation = 20;
        refused(&s, "wrong_station");
        s.operation = 30;
        refused(&s, "invalid_operation");
        refused(&scrap("STEEL-404", "1"), "unknown_lot");
        refused(&scrap("STEEL-HOLD", "1"), "lot_on_hold");
        let m = refused(&scrap("BOLT-1", "1.000001"), "insufficient_quantity");
        assert_eq!(m, "lot BOLT-1 has 1 on hand, 1.000001 to scrap");
    }
}
