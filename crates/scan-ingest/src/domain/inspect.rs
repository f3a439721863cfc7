//! `inspect`: records a lot's inspection on a work order (even a completed one); changes no
//! state but starting a released order. A lot on hold can be inspected.

use mes_domain::scan::Inspect;

use super::{Applied, Completed, Rejection, Rule, World, book, reject};

impl Rule for Inspect {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let (wo, step) = book(
            &mut world.work_orders,
            &self.work_order,
            station,
            self.operation,
            Completed::Accepted,
        )?;
        let Some(lot) = world.lots.get(&self.lot).filter(|l| l.exists()) else {
            return reject("unknown_lot", format!("lot {} does not exist", self.lot));
        };
        wo.mark_started();
        Ok(Applied {
            material: lot.material.clone(),
            operation: step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{accept, plant, refused, scan};
    use super::super::{InspectResult, Kind, ScanInput};

    fn inspect(work_order: &str, lot: &str) -> ScanInput {
        let mut s = scan(Kind::Inspect);
        s.work_order = work_order.into();
        s.lot = lot.into();
        s.result = Some(InspectResult::Fail);
        s.defect_code = "SCRATCH".into();
        s
    }

    #[test]
    fn changes_nothing_but_starting_the_order() {
        let mut world = plant();
        let applied = accept(&mut world, &inspect("WO-1", "STEEL-HOLD"));
        assert_eq!(
            (applied.material.as_str(), applied.operation),
            ("STEEL", 10)
        );
        let mut want = plant();
        let wo = want.work_orders.get_mut("WO-1").unwrap();
        wo.status = "in_progress".into();
        wo.dirty = true;
        assert_eq!(world, want);
        // A completed order's output is still inspected, and stays completed.
        accept(&mut world, &inspect("WO-DONE", "FRAME-1"));
        assert_eq!(world, want);
    }

    #[test]
    fn rejections() {
        refused(&inspect("WO-404", "FRAME-1"), "unknown_work_order");
        refused(&inspect("WO-CANCELLED", "FRAME-1"), "work_order_closed");
        refused(&inspect("WO-2", "FRAME-1"), "wrong_station");
        let mut s = inspect("WO-1", "FRAME-1");
        s.operation = 30;
        refused(&s, "invalid_operation");
        let m = refused(&inspect("WO-1", "FRAME-404"), "unknown_lot");
        assert_eq!(m, "lot FRAME-404 does not exist");
    }
}
