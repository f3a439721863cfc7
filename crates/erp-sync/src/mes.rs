//! The MES side: scan-ingest's `MasterData` upserts and its `EventFeed`, over gRPC with the
//! trace context propagated and erp-sync identified as the caller.

use std::time::Duration;

use mes_common::grpc::{self, Signed};
use mes_common::identity::{Caller, CallerKey};
use mes_proto::v1 as pb;
use mes_proto::v1::{
    event_feed_client::EventFeedClient, master_data_client::MasterDataClient,
    scan_ingest_client::ScanIngestClient,
};
use rust_decimal::Decimal;
use tonic::transport::Channel;

use crate::domain::{Material, ReceivedLot, Station, WorkOrder};
use crate::store::inbound::Counts;

type Traced = Signed<Channel>;

/// The name erp-sync calls scan-ingest with.
pub const CALLER: &str = "erp-sync";

#[derive(Clone)]
pub struct Mes {
    master: MasterDataClient<Traced>,
    ingest: ScanIngestClient<Traced>,
    feed: EventFeedClient<Traced>,
}

impl Mes {
    /// Lazy channels: building never blocks on scan-ingest.
    pub fn new(url: &str, call_timeout: Duration, key: Option<CallerKey>) -> anyhow::Result<Self> {
        let calls = grpc::channel(url, Duration::from_secs(3), call_timeout)?;
        // The feed is a long-lived stream: its channel has no per-request timeout.
        let feed = grpc::channel(
            url,
            Duration::from_secs(3),
            Duration::from_secs(365 * 86_400),
        )?;
        Ok(Self {
            master: MasterDataClient::new(grpc::signed(calls.clone(), key.clone())),
            ingest: ScanIngestClient::new(grpc::signed(calls, key.clone())),
            feed: EventFeedClient::new(grpc::signed(feed, key)),
        })
    }

    fn request<T>(message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        Caller::system(CALLER).write_to(req.metadata_mut());
        req
    }

    #[tracing::instrument(skip_all, fields(items = items.len()))]
    pub async fn upsert_materials(&self, items: Vec<Material>) -> Result<Counts, tonic::Status> {
        let items = items
            .into_iter()
            .map(|m| pb::Material {
                number: m.number,
                description: m.description,
                tracking: m.tracking.as_str().to_owned(),
                unit: m.unit,
            })
            .collect();
        let r = self
            .master
            .clone()
            .upsert_materials(Self::request(pb::UpsertMaterialsRequest { items }))
            .await?;
        Ok(counts(r.get_ref()))
    }

    #[tracing::instrument(skip_all, fields(items = items.len()))]
    pub async fn upsert_stations(&self, items: Vec<Station>) -> Result<Counts, tonic::Status> {
        let items = items
            .into_iter()
            .map(|s| pb::Station {
                id: s.id,
                name: s.name,
            })
            .collect();
        let r = self
            .master
            .clone()
            .upsert_stations(Self::request(pb::UpsertStationsRequest { items }))
            .await?;
        Ok(counts(r.get_ref()))
    }

    #[tracing::instrument(skip_all, fields(items = items.len()))]
    pub async fn upsert_received_lots(
        &self,
        items: Vec<ReceivedLot>,
    ) -> Result<Counts, tonic::Status> {
        let items = items
            .into_iter()
            .map(|l| pb::ReceivedLot {
                lot: l.lot,
                material: l.material,
                quantity: l.quantity.normalize().to_string(),
                supplier: l.supplier,
                supplier_lot: l.supplier_lot,
                received_at: l.received_at.map(|t| prost_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: t.timestamp_subsec_nanos() as i32,
                }),
            })
            .collect();
        let r = self
            .master
            .clone()
            .upsert_received_lots(Self::request(pb::UpsertReceivedLotsRequest { items }))
            .await?;
        Ok(counts(r.get_ref()))
    }

    #[tracing::instrument(skip_all, fields(items = items.len()))]
    pub async fn upsert_work_orders(&self, items: Vec<WorkOrder>) -> Result<Counts, tonic::Status> {
        let items = items
            .into_iter()
            .map(|w| pb::WorkOrderSpec {
                number: w.number,
                material: w.material,
                planned_quantity: w.planned_quantity.normalize().to_string(),
                status: w.status.as_str().to_owned(),
                operations: w
                    .operations
                    .into_iter()
                    .map(|o| pb::OperationSpec {
                        step: o.step,
                        station: o.station,
                        description: o.description,
                    })
                    .collect(),
                components: w
                    .components
                    .into_iter()
                    .map(|c| pb::Component {
                        material: c.material,
                        quantity_per_unit: c.quantity_per_unit.normalize().to_string(),
                    })
                    .collect(),
            })
            .collect();
        let r = self
            .master
            .clone()
            .upsert_work_orders(Self::request(pb::UpsertWorkOrdersRequest { items }))
            .await?;
        Ok(counts(r.get_ref()))
    }

    /// A work order's produced quantity (`None`: unknown to the MES).
    pub async fn produced_quantity(&self, number: &str) -> Result<Option<Decimal>, tonic::Status> {
        let r = self
            .ingest
            .clone()
            .get_work_order(Self::request(pb::GetWorkOrderRequest {
                number: number.to_owned(),
            }))
            .await;
        match r {
            Ok(r) => decimal(&r.get_ref().produced_quantity).map(Some),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// A lot's quantity on hand (`None`: unknown to the MES).
    pub async fn on_hand(&self, lot: &str) -> Result<Option<Decimal>, tonic::Status> {
        let r = self
            .ingest
            .clone()
            .get_lot(Self::request(pb::GetLotRequest {
                lot: lot.to_owned(),
            }))
            .await;
        match r {
            Ok(r) => decimal(&r.get_ref().quantity_on_hand).map(Some),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// Subscribes to the event feed after `after`.
    pub async fn subscribe(
        &self,
        after: u64,
    ) -> Result<tonic::Streaming<pb::Event>, tonic::Status> {
        let r = self
            .feed
            .clone()
            .subscribe(Self::request(pb::SubscribeRequest {
                after_position: after,
                consumer: CALLER.into(),
            }))
            .await?;
        Ok(r.into_inner())
    }
}

fn decimal(s: &str) -> Result<Decimal, tonic::Status> {
    if s.is_empty() {
        return Ok(Decimal::ZERO);
    }
    s.parse().map_err(|_| {
        tonic::Status::internal(format!("scan-ingest sent an unreadable quantity {s:?}"))
    })
}

fn counts(r: &pb::UpsertResponse) -> Counts {
    Counts {
        created: r.created,
        updated: r.updated,
        unchanged: r.unchanged,
        rejected: 0,
    }
}

/// Whether scan-ingest refused the records themselves (not a transport or availability
/// problem): then each record is tried alone and the refused ones are dead-lettered.
pub fn is_record_rejection(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::OutOfRange
    )
}
