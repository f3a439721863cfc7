//! The gRPC surface of trace-query: request validation, then the answer ([`crate::reads`]).

use std::sync::Arc;
use std::time::Instant;

use mes_proto::v1 as pb;
use mes_proto::v1::trace_query_server::TraceQuery;
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::domain::{self, Direction, GroupBy, Window};
use crate::error::Error;
use crate::reads::{genealogy, lot_history, production_report, work_order_summary};

#[derive(Clone)]
pub struct Api {
    state: AppState,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn finish<T>(
    query: &'static str,
    started: Instant,
    r: Result<T, Arc<Error>>,
) -> Result<Response<T>, Status> {
    metrics::histogram!("trace_query_duration_seconds", "query" => query)
        .record(started.elapsed().as_secs_f64());
    r.map(Response::new).map_err(|e| e.to_status())
}

#[tonic::async_trait]
impl TraceQuery for Api {
    #[tracing::instrument(skip_all, fields(lot = %req.get_ref().lot, direction = req.get_ref().direction, max_depth = req.get_ref().max_depth))]
    async fn get_genealogy(
        &self,
        req: Request<pb::GenealogyRequest>,
    ) -> Result<Response<pb::Genealogy>, Status> {
        let started = Instant::now();
        let r = req.get_ref();
        let lot = domain::identifier("lot", &r.lot)?;
        let depth = domain::depth(r.max_depth)?;
        let direction = Direction::from_proto(r.direction)?;
        let s = &self.state;
        finish(
            "genealogy",
            started,
            genealogy(&s.cache, &s.pool, &lot, direction, depth).await,
        )
    }

    #[tracing::instrument(skip_all, fields(lot = %req.get_ref().lot))]
    async fn get_lot_history(
        &self,
        req: Request<pb::LotHistoryRequest>,
    ) -> Result<Response<pb::LotHistory>, Status> {
        let started = Instant::now();
        let lot = domain::identifier("lot", &req.get_ref().lot)?;
        let s = &self.state;
        finish(
            "lot_history",
            started,
            lot_history(&s.cache, &s.pool, &lot).await,
        )
    }

    #[tracing::instrument(skip_all, fields(work_order = %req.get_ref().work_order))]
    async fn get_work_order_summary(
        &self,
        req: Request<pb::WorkOrderSummaryRequest>,
    ) -> Result<Response<pb::WorkOrderSummary>, Status> {
        let started = Instant::now();
        let wo = domain::identifier("work_order", &req.get_ref().work_order)?;
        let s = &self.state;
        finish(
            "work_order_summary",
            started,
            work_order_summary(&s.cache, &s.pool, &wo).await,
        )
    }

    #[tracing::instrument(skip_all, fields(group_by = req.get_ref().group_by))]
    async fn get_production_report(
        &self,
        req: Request<pb::ProductionReportRequest>,
    ) -> Result<Response<pb::ProductionReport>, Status> {
        let started = Instant::now();
        let r = req.get_ref();
        let window = Window::parse(r.from.as_ref(), r.to.as_ref())?;
        let group_by = GroupBy::from_proto(r.group_by)?;
        let s = &self.state;
        finish(
            "production_report",
            started,
            production_report(&s.cache, &s.pool, window, group_by).await,
        )
    }
}
