//! `consume`: a quantity of a component lot goes into a work order; the lot is `consumed` when
//! nothing is left of it.

use mes_domain::scan::Consume;

use super::{Applied, Completed, Rejection, Rule, World, book, reject, usable_lot};

impl Rule for Consume {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let (wo, step) = book(
            &mut world.work_orders,
            &self.work_order,
            station,
            self.operation,
            Completed::Refused,
        )?;
        // Read before the consumed lot is borrowed for change (it may be the same lot);
        // answered last, in the contract's order.
        let foreign_target = self.into_lot.as_ref().filter(|t| {
            world
                .lots
                .get(*t)
                .is_some_and(|t| t.material != wo.material)
        });
        let lot = usable_lot(&mut world.lots, &self.lot)?;
        if let Some(expected) = &self.material
            && *expected != lot.material
        {
            return reject(
                "wrong_material",
                format!("lot {} is {}, not {expected}", lot.lot, lot.material),
            );
        }
        if !wo.components.contains_key(&lot.material) {
            return reject(
                "not_in_bom",
                format!(
                    "{} is not a component of work order {}",
                    lot.material, wo.number
                ),
            );
        }
        if lot.on_hand < self.quantity {
            return reject(
                "insufficient_quantity",
                format!(
                    "lot {} has {} on hand, {} requested",
                    lot.lot, lot.on_hand, self.quantity
                ),
            );
        }
        if let Some(target) = foreign_target {
            return reject(
                "wrong_material",
                format!(
                    "into_lot {target} is not an output of work order {}",
                    wo.number
                ),
            );
        }
        lot.on_hand -= self.quantity;
        if lot.on_hand.is_zero() {
            lot.status = "consumed".into();
        }
        lot.dirty = true;
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

    fn consume(lot: &str, quantity: &str) -> ScanInput {
        lot_scan(Kind::Consume, lot, quantity)
    }

    #[test]
    fn takes_the_quantity_from_the_lot_and_starts_the_order() {
        let mut world = plant();
        let applied = accept(&mut world, &consume("STEEL-1", "2.5"));
        // Booked on the order's step at the scan's station; the lot's material.
        assert_eq!(
            (applied.material.as_str(), applied.operation),
            ("STEEL", 10)
        );
        let lot = &world.lots["STEEL-1"];
        assert_eq!(
            (lot.on_hand, lot.status.as_str(), lot.dirty),
            (dec("97.5"), "active", true)
        );
        let wo = &world.work_orders["WO-1"];
        assert_eq!((wo.status.as_str(), wo.dirty), ("in_progress", true));
        // Consuming records no progress on the step.
        assert_eq!(wo.operations[&10].good, dec("0"));
    }

    #[test]
    fn the_last_of_a_lot_consumes_it_into_an_output_lot() {
        let mut world = plant();
        let mut s = consume("BOLT-1", "1");
        s.material = "BOLT".into();
        s.into_lot = "FRAME-1".into();
        accept(&mut world, &s);
        let lot = &world.lots["BOLT-1"];
        assert_eq!((lot.on_hand, lot.status.as_str()), (dec("0"), "consumed"));
        refused(&consume("BOLT-1", "2"), "insufficient_quantity");
    }

    #[test]
    fn rejections() {
        let mut s = consume("STEEL-1", "1");
        s.work_order = "WO-404".into();
        refused(&s, "unknown_work_order");
        s.work_order = "WO-DONE".into();
        refused(&s, "work_order_closed");
        s.work_order = "WO-1".into();
        s.station = "ST-30".into();
        let m = refused(&s, "wrong_station");
        assert_eq!(m, "work order WO-1 has no operation at ST-30");

        let m = refused(&consume("STEEL-404", "1"), "unknown_lot");
        assert_eq!(m, "lot STEEL-404 does not exist");
        refused(&consume("STEEL-HOLD", "1"), "lot_on_hold");
        let mut s = consume("STEEL-1", "1");
        s.material = "BOLT".into();
        let m = refused(&s, "wrong_material");
        assert_eq!(m, "lot STEEL-1 is STEEL, not BOLT");
        let m = refused(&consume("WHEEL-1", "1"), "not_in_bom");
        assert_eq!(m, "WHEEL is not a component of work order WO-1");
        let m = refused(&consume("STEEL-1", "100.5"), "insufficient_quantity");
        assert_eq!(m, "lot STEEL-1 has 100 on hand, 100.5 requested");
        let mut s = consume("STEEL-1", "1");
        s.into_lot = "SN-1".into();
        let m = refused(&s, "wrong_material");
        assert_eq!(m, "into_lot SN-1 is not an output of work order WO-1");
    }
}
