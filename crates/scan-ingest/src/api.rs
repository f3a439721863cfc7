//! The gRPC surface of scan-ingest: ScanIngest, MasterData and EventFeed.

use mes_common::Shutdown;
use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use mes_proto::v1::{
    event_feed_server::EventFeed, master_data_server::MasterData, scan_ingest_server::ScanIngest,
};
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::domain;
use crate::error::Error;
use crate::store::{corrections, master, queries, scans};

#[derive(Clone)]
pub struct Api {
    state: AppState,
    shutdown: Shutdown,
}

impl Api {
    pub fn new(state: AppState, shutdown: Shutdown) -> Self {
        Self { state, shutdown }
    }

    /// Holds (`hold = true`) or releases a lot for the calling quality engineer or supervisor.
    async fn set_hold(
        &self,
        req: Request<pb::LotStatusRequest>,
        hold: bool,
    ) -> Result<Response<pb::Lot>, Status> {
        let caller = caller(&req)?;
        require_role(
            &caller,
            &["quality", "supervisor"],
            "holding and releasing lots needs the quality or supervisor role",
        )?;
        let r = req.get_ref();
        let lot = corrections::set_hold(&self.state.pool, &r.lot, &r.reason, hold, &caller).await?;
        self.state.feed.committed();
        Ok(Response::new(lot))
    }
}

fn caller<T>(req: &Request<T>) -> Result<Caller, Error> {
    Caller::from_metadata(req.metadata()).ok_or(Error::Unauthenticated)
}

/// Sensitive operations check the caller's roles again here, after the gateway did (admins
/// pass every check: `Caller::has_any_role`).
fn require_role(caller: &Caller, roles: &[&str], why: &str) -> Result<(), Error> {
    if caller.has_any_role(roles) {
        Ok(())
    } else {
        Err(Error::PermissionDenied(why.into()))
    }
}

#[tonic::async_trait]
impl ScanIngest for Api {
    #[tracing::instrument(skip_all, fields(scans = req.get_ref().scans.len()))]
    async fn submit_scans(
        &self,
        req: Request<pb::SubmitScansRequest>,
    ) -> Result<Response<pb::SubmitScansResponse>, Status> {
        let caller = caller(&req)?;
        let inputs = tracing::info_span!("scan.validate")
            .in_scope(|| domain::validate_batch(&req.get_ref().scans, chrono::Utc::now()))
            .map_err(Error::Invalid)?;
        metrics::histogram!("scan_batch_size").record(inputs.len() as f64);
        let results = self
            .state
            .committer
            .submit(scans::Request {
                inputs,
                caller,
                traceparent: mes_common::propagation::current_traceparent(),
            })
            .await?;
        if results
            .iter()
            .any(|r| r.status == pb::ScanStatus::Accepted as i32)
        {
            self.state.feed.committed();
        }
        Ok(Response::new(pb::SubmitScansResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(scan_id = %req.get_ref().scan_id))]
    async fn get_scan(
        &self,
        req: Request<pb::GetScanRequest>,
    ) -> Result<Response<pb::StoredScan>, Status> {
        Ok(Response::new(
            queries::get_scan(&self.state.pool, &req.get_ref().scan_id).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(scan_id = %req.get_ref().scan_id, confirm = req.get_ref().confirm))]
    async fn void_scan(
        &self,
        req: Request<pb::VoidScanRequest>,
    ) -> Result<Response<pb::VoidScanResponse>, Status> {
        let caller = caller(&req)?;
        require_role(
            &caller,
            &["supervisor"],
            "voiding scans needs the supervisor role",
        )?;
        let r = req.get_ref();
        let out =
            corrections::void(&self.state.pool, &r.scan_id, &r.reason, r.confirm, &caller).await?;
        if !out.void_scan_id.is_empty() {
            self.state.feed.committed();
        }
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all, fields(lot = %req.get_ref().lot))]
    async fn hold_lot(
        &self,
        req: Request<pb::LotStatusRequest>,
    ) -> Result<Response<pb::Lot>, Status> {
        self.set_hold(req, true).await
    }

    #[tracing::instrument(skip_all, fields(lot = %req.get_ref().lot))]
    async fn release_lot(
        &self,
        req: Request<pb::LotStatusRequest>,
    ) -> Result<Response<pb::Lot>, Status> {
        self.set_hold(req, false).await
    }

    #[tracing::instrument(skip_all)]
    async fn list_work_orders(
        &self,
        req: Request<pb::ListWorkOrdersRequest>,
    ) -> Result<Response<pb::ListWorkOrdersResponse>, Status> {
        Ok(Response::new(
            queries::list_work_orders(&self.state.pool, req.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(work_order = %req.get_ref().number))]
    async fn get_work_order(
        &self,
        req: Request<pb::GetWorkOrderRequest>,
    ) -> Result<Response<pb::WorkOrder>, Status> {
        Ok(Response::new(
            queries::get_work_order(&self.state.pool, &req.get_ref().number).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(lot = %req.get_ref().lot))]
    async fn get_lot(&self, req: Request<pb::GetLotRequest>) -> Result<Response<pb::Lot>, Status> {
        Ok(Response::new(
            queries::get_lot(&self.state.pool, &req.get_ref().lot).await?,
        ))
    }
}

#[tonic::async_trait]
impl MasterData for Api {
    #[tracing::instrument(skip_all, fields(items = req.get_ref().items.len()))]
    async fn upsert_materials(
        &self,
        req: Request<pb::UpsertMaterialsRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let counts = master::upsert_materials(&self.state.pool, &req.get_ref().items).await?;
        self.state.feed.committed();
        self.state.refcache.invalidate(
            req.get_ref()
                .items
                .iter()
                .map(|m| m.number.clone())
                .collect(),
            Vec::new(),
        );
        Ok(Response::new(counts.into()))
    }

    #[tracing::instrument(skip_all, fields(items = req.get_ref().items.len()))]
    async fn upsert_stations(
        &self,
        req: Request<pb::UpsertStationsRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let counts = master::upsert_stations(&self.state.pool, &req.get_ref().items).await?;
        self.state.feed.committed();
        self.state.refcache.invalidate(
            Vec::new(),
            req.get_ref().items.iter().map(|s| s.id.clone()).collect(),
        );
        Ok(Response::new(counts.into()))
    }

    #[tracing::instrument(skip_all, fields(items = req.get_ref().items.len()))]
    async fn upsert_received_lots(
        &self,
        req: Request<pb::UpsertReceivedLotsRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let counts = master::upsert_received_lots(&self.state.pool, &req.get_ref().items).await?;
        self.state.feed.committed();
        Ok(Response::new(counts.into()))
    }

    #[tracing::instrument(skip_all, fields(items = req.get_ref().items.len()))]
    async fn upsert_work_orders(
        &self,
        req: Request<pb::UpsertWorkOrdersRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let counts = master::upsert_work_orders(&self.state.pool, &req.get_ref().items).await?;
        self.state.feed.committed();
        Ok(Response::new(counts.into()))
    }
}

#[tonic::async_trait]
impl EventFeed for Api {
    #[tracing::instrument(skip_all, fields(after = req.get_ref().after_position, consumer = %req.get_ref().consumer))]
    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::Event>>, Status> {
        let after = i64::try_from(req.get_ref().after_position)
            .map_err(|_| Status::from(Error::invalid("after_position", "is out of range")))?;
        let consumer = if req.get_ref().consumer.is_empty() {
            "anonymous".to_owned()
        } else {
            req.get_ref().consumer.clone()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(
            self.state
                .feed
                .clone()
                .stream(after, consumer, tx, self.shutdown.clone()),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
