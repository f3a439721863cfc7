//! `start_operation`: the named routing step begins; the first scan starts a released order.

use mes_domain::scan::Start;

use super::{Applied, Completed, Rejection, Rule, World, open_order, unfinished_step};

impl Rule for Start {
    fn apply(&self, world: &mut World, station: &str) -> Result<Applied, Rejection> {
        let wo = open_order(&mut world.work_orders, &self.work_order, Completed::Refused)?;
        let step = unfinished_step(wo, station, self.operation)?;
        wo.update_operation(step, |op| op.status = "in_progress".into());
        wo.dirty = true;
        wo.mark_started();
        Ok(Applied {
            material: wo.material.clone(),
            operation: step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Kind;
    use super::super::fixture::{accept, plant, refused, scan};

    fn start(work_order: &str, operation: i32) -> super::super::ScanInput {
        let mut s = scan(Kind::StartOperation);
        s.work_order = work_order.into();
        s.operation = operation;
        s
    }

    #[test]
    fn starts_the_step_and_the_released_order() {
        let mut world = plant();
        let applied = accept(&mut world, &start("WO-1", 10));
        assert_eq!(
            (applied.material.as_str(), applied.operation),
            ("FRAME", 10)
        );
        let wo = &world.work_orders["WO-1"];
        assert_eq!(wo.operations[&10].status, "in_progress");
        assert_eq!(wo.operations[&20].status, "released");
        assert_eq!(wo.status, "in_progress");
        assert!(wo.dirty);
        // Starting it again is allowed (a second operator, a restarted tablet).
        accept(&mut world, &start("WO-1", 10));
        assert_eq!(
            world.work_orders["WO-1"].operations[&10].status,
            "in_progress"
        );
    }

    #[test]
    fn rejections() {
        refused(&start("WO-404", 10), "unknown_work_order");
        refused(&start("WO-CLOSED", 10), "work_order_closed");
        refused(&start("WO-CANCELLED", 10), "work_order_closed");
        let m = refused(&start("WO-DONE", 10), "work_order_closed");
        assert_eq!(m, "work order WO-DONE is completed");
        let m = refused(&start("WO-1", 30), "invalid_operation");
        assert_eq!(m, "work order WO-1 has no operation 30");
        let m = refused(&start("WO-1", 20), "wrong_station");
        assert_eq!(m, "operation 20 runs at ST-20, not ST-10");

        let mut world = plant();
        let mut done = start("WO-1", 10);
        done.kind = Kind::CompleteOperation;
        accept(&mut world, &done);
        let r = world.apply(&start("WO-1", 10), None).unwrap_err();
        assert_eq!(r.code, "invalid_operation");
        assert_eq!(r.message, "operation 10 is already completed");
    }
}
