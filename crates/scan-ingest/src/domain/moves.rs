//! `move`: a lot goes to another location, booked on a work order or on none (even a completed
//! order: its output is moved away). The quantity is the lot's at most; the whole lot moves.

use mes_domain::scan::Move;

use super::{Applied, Completed, Rejection, Rule, World, book, reject, usable_lot};

impl Rule for Move {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let mut booked = match &self.work_order {
            Some(number) => Some(book(
                &mut world.work_orders,
                number,
                station,
                self.operation,
                Completed::Accepted,
            )?),
            None => None,
        };
        let lot = usable_lot(&mut world.lots, &self.lot)?;
        if lot.on_hand < self.quantity {
            return reject(
                "insufficient_quantity",
                format!(
                    "lot {} has {} on hand, {} to move",
                    lot.lot, lot.on_hand, self.quantity
                ),
            );
        }
        lot.location = self.location.clone();
        lot.dirty = true;
        if let Some((wo, _)) = booked.as_mut() {
            wo.mark_started();
        }
        Ok(Applied {
            material: lot.material.clone(),
            // Without a work order, the step as the scan gave it (none: 0).
            operation: booked
                .map(|(_, step)| step)
                .or(self.operation)
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{accept, dec, lot_scan, plant, refused};
    use super::super::{Kind, ScanInput};

    fn move_(lot: &str, quantity: &str) -> ScanInput {
        let mut s = lot_scan(Kind::Move, lot, quantity);
        s.work_order.clear();
        s.location = "DOCK-2".into();
        s
    }

    #[test]
    fn moves_the_lot_without_a_work_order() {
        let mut world = plant();
        let applied = accept(&mut world, &move_("STEEL-1", "10"));
        assert_eq!((applied.material.as_str(), applied.operation), ("STEEL", 0));
        let lot = &world.lots["STEEL-1"];
        assert_eq!(
            (lot.location.as_str(), lot.on_hand, lot.dirty),
            ("DOCK-2", dec("100"), true)
        );
        assert!(world.work_orders.values().all(|w| !w.dirty));
        // The step as given, when there is no order to resolve it on.
        let mut s = move_("STEEL-1", "1");
        s.operation = 7;
        assert_eq!(accept(&mut world, &s).operation, 7);
    }

    #[test]
    fn on_a_work_order_it_starts_it_even_a_completed_one_takes_it() {
        let mut world = plant();
        let mut s = move_("FRAME-1", "5");
        s.work_order = "WO-1".into();
        assert_eq!(accept(&mut world, &s).operation, 10);
        assert_eq!(world.work_orders["WO-1"].status, "in_progress");
        s.work_order = "WO-DONE".into();
        accept(&mut world, &s);
        assert_eq!(world.work_orders["WO-DONE"].status, "completed");
        assert!(!world.work_orders["WO-DONE"].dirty);
    }

    #[test]
    fn rejections() {
        let mut s = move_("STEEL-1", "1");
        s.work_order = "WO-404".into();
        refused(&s, "unknown_work_order");
        s.work_order = "WO-CLOSED".into();
        refused(&s, "work_order_closed");
        s.work_order = "WO-2".into();
        refused(&s, "wrong_station");
        refused(&move_("STEEL-404", "1"), "unknown_lot");
        refused(&move_("STEEL-HOLD", "1"), "lot_on_hold");
        let m = refused(&move_("BOLT-1", "2"), "insufficient_quantity");
        assert_eq!(m, "lot BOLT-1 has 1 on hand, 2 to move");
    }
}
