//! Test harness: scan-ingest started on :0 against a fresh database, the demo plant loaded
//! through its own MasterData API, and helpers to build scans.

#![allow(dead_code)]

use std::time::Duration;

use mes_common::Shutdown;
use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use mes_proto::v1::{
    event_feed_client::EventFeedClient, master_data_client::MasterDataClient,
    scan_ingest_client::ScanIngestClient,
};
use scan_ingest::{Application, Settings};
// Channels signing with the test internal key, as the services sign their calls.
use mes_common::testing::Channel;

pub struct TestApp {
    pub port: u16,
    pub db_url: String,
    pub pool: sqlx::PgPool,
    pub feed: scan_ingest::feed::FeedHub,
    /// The service's own Redis client (its key prefix), to look at the reference cache.
    pub redis: mes_common::cache::Redis,
    /// The service's reference cache itself.
    pub refcache: scan_ingest::refcache::RefCache,
    pub channel: Channel,
    shutdown: Shutdown,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dropped: bool,
    /// Deletes the test's Redis keys when the app is dropped (stopped or not).
    _keys: mes_common::testing::RedisGuard,
}

impl TestApp {
    pub fn scans(&self) -> ScanIngestClient<Channel> {
        ScanIngestClient::new(self.channel.clone())
    }
    pub fn master(&self) -> MasterDataClient<Channel> {
        MasterDataClient::new(self.channel.clone())
    }
    pub fn feed_client(&self) -> EventFeedClient<Channel> {
        EventFeedClient::new(self.channel.clone())
    }

    /// Submits `scans` as `caller`.
    pub async fn submit_as(
        &self,
        caller: &Caller,
        scans: Vec<pb::Scan>,
    ) -> Result<Vec<pb::ScanResult>, tonic::Status> {
        let mut req = tonic::Request::new(pb::SubmitScansRequest { scans });
        caller.write_to(req.metadata_mut());
        Ok(self.scans().submit_scans(req).await?.into_inner().results)
    }

    pub async fn submit(&self, scans: Vec<pb::Scan>) -> Vec<pb::ScanResult> {
        self.submit_as(&operator(), scans).await.expect("submit")
    }

    /// What the service's Redis holds under `key` (its prefix added), if anything.
    pub async fn cached(&self, key: &str) -> Option<String> {
        use fred::interfaces::KeysInterface;
        self.redis
            .client()
            .get::<Option<String>, _>(self.redis.key(key))
            .await
            .ok()
            .flatten()
    }

    pub async fn lot(&self, lot: &str) -> pb::Lot {
        self.scans()
            .get_lot(pb::GetLotRequest { lot: lot.into() })
            .await
            .expect("get lot")
            .into_inner()
    }

    pub async fn work_order(&self, number: &str) -> pb::WorkOrder {
        self.scans()
            .get_work_order(pb::GetWorkOrderRequest {
                number: number.into(),
            })
            .await
            .expect("get wo")
            .into_inner()
    }

    /// Stops the service and drops its database.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        self.pool.close().await;
        mes_common::db::drop_database(&self.db_url)
            .await
            .expect("drop test database");
        self.dropped = true;
    }
}

impl Drop for TestApp {
    /// A test that failed before `stop` still drops its database (from a runtime of its own:
    /// the test's runtime may be gone or busy).
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        self.shutdown.trigger();
        let url = self.db_url.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(mes_common::db::drop_database(&url));
            }
        })
        .join();
    }
}

pub use mes_common::testing::wait_for;

pub fn operator() -> Caller {
    Caller {
        user: "op1".into(),
        roles: vec!["operator".into()],
        device: None,
        station: None,
    }
}

pub fn supervisor() -> Caller {
    Caller {
        user: "sup1".into(),
        roles: vec!["supervisor".into()],
        device: None,
        station: None,
    }
}

pub fn quality() -> Caller {
    Caller {
        user: "qa1".into(),
        roles: vec!["quality".into()],
        device: None,
        station: None,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let name = format!("mes_test_si_{}", uuid::Uuid::new_v4().simple());
    let db_url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let mut settings = Settings::default();
    settings.service.database_url = db_url.clone();
    settings.service.listen_addr = "127.0.0.1:0".into();
    settings.service.metrics_addr = String::new();
    settings.service.redis_prefix = format!("test:{name}:");
    settings.service.internal_key = mes_common::testing::internal_key();
    settings.sequencer_interval_ms = 50;
    settings.ledger_check_interval_seconds = 0;
    customise(&mut settings);
    let redis_url = settings.service.redis_url.clone();
    let redis_prefix = settings.service.redis_prefix.clone();
    let app = Application::build(settings)
        .await
        .expect("build scan-ingest");
    let port = app.port();
    let pool = app.state().pool.clone();
    let feed = app.state().feed.clone();
    let redis = app.state().redis.clone();
    let refcache = app.state().refcache.clone();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let channel = mes_common::testing::signed(
        mes_common::grpc::channel(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .expect("channel"),
    );
    TestApp {
        port,
        db_url,
        pool,
        feed,
        redis,
        refcache,
        channel,
        shutdown,
        handle: Some(handle),
        dropped: false,
        _keys: mes_common::testing::RedisGuard {
            url: redis_url,
            prefix: redis_prefix,
        },
    }
}

/// Loads `deploy/demo/plant.json` through the MasterData API.
pub async fn load_demo_plant(app: &TestApp) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/demo/plant.json"
    ))
    .expect("plant");
    let plant: serde_json::Value = serde_json::from_str(&text).expect("plant json");
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let materials = plant["materials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| pb::Material {
            number: s(m, "number"),
            description: s(m, "description"),
            tracking: s(m, "tracking"),
            unit: s(m, "unit"),
        })
        .collect();
    let stations = plant["stations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| pb::Station {
            id: s(m, "id"),
            name: s(m, "name"),
        })
        .collect();
    let lots = plant["lots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| pb::ReceivedLot {
            lot: s(m, "lot"),
            material: s(m, "material"),
            quantity: s(m, "quantity"),
            supplier: s(m, "supplier"),
            supplier_lot: s(m, "supplier_lot"),
            received_at: None,
        })
        .collect();
    let wos = plant["work_orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| pb::WorkOrderSpec {
            number: s(w, "number"),
            material: s(w, "material"),
            planned_quantity: s(w, "planned_quantity"),
            status: s(w, "status"),
            operations: w["operations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| pb::OperationSpec {
                    step: o["step"].as_u64().unwrap() as u32,
                    station: s(o, "station"),
                    description: s(o, "description"),
                })
                .collect(),
            components: w["components"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| pb::Component {
                    material: s(c, "material"),
                    quantity_per_unit: s(c, "quantity_per_unit"),
                })
                .collect(),
        })
        .collect();
    let mut m = app.master();
    m.upsert_materials(pb::UpsertMaterialsRequest { items: materials })
        .await
        .expect("materials");
    m.upsert_stations(pb::UpsertStationsRequest { items: stations })
        .await
        .expect("stations");
    m.upsert_received_lots(pb::UpsertReceivedLotsRequest { items: lots })
        .await
        .expect("lots");
    m.upsert_work_orders(pb::UpsertWorkOrdersRequest { items: wos })
        .await
        .expect("work orders");
}

pub fn now() -> Option<prost_types::Timestamp> {
    let t = chrono::Utc::now();
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

pub fn scan(kind: pb::ScanKind, wo: &str, op: u32, station: &str) -> pb::Scan {
    pb::Scan {
        scan_id: uuid::Uuid::new_v4().to_string(),
        kind: kind as i32,
        work_order: wo.into(),
        operation: op,
        station: station.into(),
        scanned_at: now(),
        ..Default::default()
    }
}

pub fn with_lot(mut s: pb::Scan, lot: &str, qty: &str) -> pb::Scan {
    s.lot = lot.into();
    s.quantity = qty.into();
    s
}

pub fn status(r: &pb::ScanResult) -> (pb::ScanStatus, String) {
    (
        pb::ScanStatus::try_from(r.status).unwrap_or(pb::ScanStatus::Unspecified),
        r.error.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
    )
}

pub fn accepted(results: &[pb::ScanResult]) {
    for r in results {
        assert_eq!(
            status(r),
            (pb::ScanStatus::Accepted, String::new()),
            "{r:?}"
        );
    }
}
