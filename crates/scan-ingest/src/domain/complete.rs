//! `complete_operation`: the named routing step ends; the last one completes the order.

use mes_domain::scan::Complete;

use super::{Applied, Completed, Rejection, Rule, World, open_order, unfinished_step};

impl Rule for Complete {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let wo = open_order(&mut world.work_orders, &self.work_order, Completed::Refused)?;
        let step = unfinished_step(wo, station, self.operation)?;
        wo.update_operation(step, |op| op.status = "completed".into());
        wo.dirty = true;
        wo.mark_started();
        if wo.operations.values().all(|o| o.status == "completed") {
            wo.status = "completed".into();
        }
        Ok(Applied {
            material: wo.material.clone(),
            operation: step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{accept, plant, refused, scan};
    use super::super::{Kind, ScanInput};

    fn complete(work_order: &str, operation: i32, station: &str) -> ScanInput {
        let mut s = scan(Kind::CompleteOperation);
        s.work_order = work_order.into();
        s.operation = operation;
        s.station = station.into();
        s
    }

    #[test]
    fn the_last_step_completes_the_order() {
        let mut world = plant();
        let applied = accept(&mut world, &complete("WO-1", 10, "ST-10"));
        assert_eq!(
            (applied.material.as_str(), applied.operation),
            ("FRAME", 10)
        );
        let wo = &world.work_orders["WO-1"];
        assert_eq!(wo.operations[&10].status, "completed");
        assert_eq!(wo.status, "in_progress");
        accept(&mut world, &complete("WO-1", 20, "ST-20"));
        let wo = &world.work_orders["WO-1"];
        assert_eq!(wo.operations[&20].status, "completed");
        assert_eq!(wo.status, "completed");
        assert!(wo.dirty);
        // A completed order takes no more completions (nor starts, consumes...).
        let r = world
            .apply(&complete("WO-1", 20, "ST-20"), None)
            .unwrap_err();
        assert_eq!(r.code, "work_order_closed");
    }

    #[test]
    fn rejections() {
        refused(&complete("WO-404", 10, "ST-10"), "unknown_work_order");
        refused(&complete("WO-CLOSED", 10, "ST-10"), "work_order_closed");
        refused(&complete("WO-DONE", 10, "ST-10"), "work_order_closed");
        refused(&complete("WO-1", 30, "ST-10"), "invalid_operation");
        refused(&complete("WO-1", 10, "ST-20"), "wrong_station");

        let mut world = plant();
        accept(&mut world, &complete("WO-1", 10, "ST-10"));
        let r = world
            .apply(&complete("WO-1", 10, "ST-10"), None)
            .unwrap_err();
        assert_eq!(r.code, "invalid_operation");
        assert_eq!(r.message, "operation 10 is already completed");
    }
}
