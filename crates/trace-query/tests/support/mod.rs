//! The test harness: a real scan-ingest and trace-query instances started in-process on :0,
//! each test with its own databases (dropped at the end, also when the test fails) and its own
//! Redis prefixes (deleted at the end); the demo plant loaded through scan-ingest's MasterData
//! API and the typical run of docs/demo-plant.md submitted through its SubmitScans API.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use fred::interfaces::ClientLike;
use mes_common::Shutdown;
use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use mes_proto::v1::{
    master_data_client::MasterDataClient, scan_ingest_client::ScanIngestClient,
    trace_query_client::TraceQueryClient,
};
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
// Channels signing with the test internal key, as the services sign their calls.
use mes_common::testing::Channel;
use trace_query::AppState;

const PG: &str = "postgres://postgres@127.0.0.1:5432";

pub use mes_common::testing::{DbGuard, RedisGuard};

pub struct ScanIngest {
    pub port: u16,
    pub pool: PgPool,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

/// One test's world: a scan-ingest with the demo plant, a database for trace-query instances.
pub struct TestEnv {
    pub unique: String,
    pub si_url: String,
    pub tq_url: String,
    pub si: Option<ScanIngest>,
    si_port: u16,
    // Dropped last, after the services stopped.
    _redis: Vec<RedisGuard>,
    _databases: [DbGuard; 2],
}

#[derive(Clone, Default)]
pub struct TqOptions {
    /// Default: the machine's Redis.
    pub redis_url: Option<String>,
    pub prewarm: Option<bool>,
    /// Default 1000 ms: a loaded test machine must not pass for a failing Redis.
    pub redis_timeout_ms: Option<u64>,
    /// How long a replica waits for another's answer under the cross-replica lock (default:
    /// the service's).
    pub cache_lock_wait_ms: Option<u64>,
    /// Random spread of cache TTLs in percent (default: the service's).
    pub ttl_jitter_percent: Option<u64>,
}

pub struct TraceQueryApp {
    pub state: AppState,
    pub port: u16,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start_scan_ingest(url: &str, unique: &str, listen: &str) -> ScanIngest {
    let mut settings = scan_ingest::Settings::default();
    settings.service.database_url = url.to_owned();
    settings.service.listen_addr = listen.to_owned();
    settings.service.metrics_addr = String::new();
    settings.service.redis_prefix = format!("test:tq-si:{unique}:");
    settings.service.shutdown_grace_seconds = 3;
    settings.service.internal_key = mes_common::testing::internal_key();
    settings.sequencer_interval_ms = 50;
    settings.ledger_check_interval_seconds = 0;
    let mut last = None;
    // The port of a stopped instance may take a moment to be free again.
    for _ in 0..50 {
        match scan_ingest::Application::build(settings.clone()).await {
            Ok(app) => {
                let port = app.port();
                let pool = app.state().pool.clone();
                let shutdown = Shutdown::new();
                let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
                return ScanIngest {
                    port,
                    pool,
                    shutdown,
                    task,
                };
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("scan-ingest does not start: {last:?}");
}

/// Spans with OpenTelemetry contexts (no exporter, no logs), so W3C trace context travels
/// through the in-process services as it does between processes.
fn init_tracing() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        mes_common::telemetry::set_propagator();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = provider.tracer("trace-query-tests");
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(
                "info,h2=off,hyper=off,tower=off",
            ))
            .with(tracing_opentelemetry::layer().with_tracer(tracer));
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

impl TestEnv {
    /// A scan-ingest on :0 with the demo plant loaded.
    pub async fn new() -> Self {
        init_tracing();
        let unique = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let si_url = format!("{PG}/test_tq_si_{unique}");
        let tq_url = format!("{PG}/test_tq_{unique}");
        let databases = [
            DbGuard {
                url: si_url.clone(),
            },
            DbGuard {
                url: tq_url.clone(),
            },
        ];
        let si = start_scan_ingest(&si_url, &unique, "127.0.0.1:0").await;
        let env = Self {
            si_port: si.port,
            si: Some(si),
            _redis: vec![
                RedisGuard {
                    url: "redis://127.0.0.1:6379".into(),
                    prefix: format!("test:tq-si:{unique}:"),
                },
                RedisGuard {
                    url: "redis://127.0.0.1:6379".into(),
                    prefix: format!("test:tq:{unique}:"),
                },
            ],
            unique,
            si_url,
            tq_url,
            _databases: databases,
        };
        env.load_demo_plant().await;
        env
    }

    pub fn si_pool(&self) -> &PgPool {
        &self.si.as_ref().expect("scan-ingest runs").pool
    }

    fn si_channel(&self) -> Channel {
        lazy_channel(self.si_port)
    }

    pub fn scans(&self) -> ScanIngestClient<Channel> {
        ScanIngestClient::new(self.si_channel())
    }

    pub fn master(&self) -> MasterDataClient<Channel> {
        MasterDataClient::new(self.si_channel())
    }

    /// Stops scan-ingest (its feed streams end).
    pub async fn stop_scan_ingest(&mut self) {
        if let Some(si) = self.si.take() {
            si.shutdown.trigger();
            let _ = tokio::time::timeout(Duration::from_secs(10), si.task).await;
            si.pool.close().await;
        }
    }

    /// Starts scan-ingest again on the same database and port.
    pub async fn start_scan_ingest(&mut self) {
        let listen = format!("127.0.0.1:{}", self.si_port);
        self.si = Some(start_scan_ingest(&self.si_url, &self.unique, &listen).await);
    }

    /// Starts a trace-query instance on the test's trace-query database, following scan-ingest.
    pub async fn spawn_trace_query(&self, options: TqOptions) -> TraceQueryApp {
        let mut s = trace_query::Settings::default();
        s.service.database_url = self.tq_url.clone();
        s.service.listen_addr = "127.0.0.1:0".into();
        s.service.metrics_addr = String::new();
        s.service.redis_prefix = format!("test:tq:{}:", self.unique);
        s.service.shutdown_grace_seconds = 3;
        s.service.internal_key = mes_common::testing::internal_key();
        if let Some(url) = options.redis_url {
            s.service.redis_url = url;
        }
        s.scan_ingest_url = format!("http://127.0.0.1:{}", self.si_port);
        s.feed_retry_initial_ms = 50;
        s.feed_retry_max_ms = 500;
        s.projection_lease_retry_ms = 200;
        s.lot_filter_capacity = 100_000;
        if let Some(p) = options.prewarm {
            s.prewarm = p;
        }
        s.cache_command_timeout_ms = options.redis_timeout_ms.unwrap_or(1000);
        if let Some(ms) = options.cache_lock_wait_ms {
            s.cache_lock_wait_ms = ms;
        }
        if let Some(pct) = options.ttl_jitter_percent {
            s.cache_ttl_jitter_percent = pct;
        }
        let app = trace_query::Application::build(s)
            .await
            .expect("trace-query starts");
        let port = app.port();
        let state = app.state().clone();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        TraceQueryApp {
            state,
            port,
            shutdown,
            task,
        }
    }

    /// The last position scan-ingest sequenced, once every committed event is sequenced.
    pub async fn feed_head(&self) -> i64 {
        let pool = self.si_pool();
        // The sequencer runs in the background: wait for it (a head read too early would let
        // `caught_up` return before the last events were applied).
        let sequenced = wait_for(Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM event_log WHERE position IS NULL")
                .fetch_one(pool)
                .await
                .expect("event log")
                == 0
        })
        .await;
        assert!(
            sequenced,
            "scan-ingest did not sequence its events within 20 s"
        );
        sqlx::query_scalar("SELECT last_position FROM feed_sequencer WHERE id = 1")
            .fetch_one(pool)
            .await
            .expect("feed head")
    }

    /// Waits until `app` applied everything scan-ingest has sequenced.
    pub async fn caught_up(&self, app: &TraceQueryApp) -> i64 {
        let head = self.feed_head().await;
        let ok = wait_for(Duration::from_secs(20), || async {
            app.state.projection.position().await.unwrap_or(-1) >= head
        })
        .await;
        assert!(ok, "trace-query did not reach feed position {head}");
        head
    }

    /// [`Self::caught_up`], then waits until the cache's delayed deletes and pre-warmings are
    /// done (so a test can count cache hits exactly).
    pub async fn settled(&self, app: &TraceQueryApp) -> i64 {
        let head = self.caught_up(app).await;
        let ok = wait_for(Duration::from_secs(10), || async {
            app.state.cache.settled()
        })
        .await;
        assert!(ok, "background cache work did not finish");
        head
    }

    /// Loads `deploy/demo/plant.json` through the MasterData API.
    pub async fn load_demo_plant(&self) {
        let plant = demo_plant();
        let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let list = |k: &str| plant[k].as_array().cloned().unwrap_or_default();
        let mut m = self.master();
        m.upsert_materials(admin(pb::UpsertMaterialsRequest {
            items: list("materials")
                .iter()
                .map(|m| pb::Material {
                    number: s(m, "number"),
                    description: s(m, "description"),
                    tracking: s(m, "tracking"),
                    unit: s(m, "unit"),
                })
                .collect(),
        }))
        .await
        .expect("materials");
        m.upsert_stations(admin(pb::UpsertStationsRequest {
            items: list("stations")
                .iter()
                .map(|m| pb::Station {
                    id: s(m, "id"),
                    name: s(m, "name"),
                })
                .collect(),
        }))
        .await
        .expect("stations");
        m.upsert_received_lots(admin(pb::UpsertReceivedLotsRequest {
            items: list("lots")
                .iter()
                .map(|m| pb::ReceivedLot {
                    lot: s(m, "lot"),
                    material: s(m, "material"),
                    quantity: s(m, "quantity"),
                    supplier: s(m, "supplier"),
                    supplier_lot: s(m, "supplier_lot"),
                    received_at: None,
                })
                .collect(),
        }))
        .await
        .expect("lots");
        let wos = list("work_orders")
            .iter()
            .map(|w| pb::WorkOrderSpec {
                number: s(w, "number"),
                material: s(w, "material"),
                planned_quantity: s(w, "planned_quantity"),
                status: s(w, "status"),
                operations: w["operations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|o| pb::OperationSpec {
                        step: o["step"].as_u64().unwrap_or(0) as u32,
                        station: s(o, "station"),
                        description: s(o, "description"),
                    })
                    .collect(),
                components: w["components"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|c| pb::Component {
                        material: s(c, "material"),
                        quantity_per_unit: s(c, "quantity_per_unit"),
                    })
                    .collect(),
            })
            .collect();
        m.upsert_work_orders(admin(pb::UpsertWorkOrdersRequest { items: wos }))
            .await
            .expect("work orders");
    }

    /// Another frame work order (released), for scans after the typical run completed WO-1000.
    /// A second frame order: WO-2000 consumes 10 of STEEL-L2 into FRAME-L2 (4), a new edge.
    pub async fn frame_l2_from_steel_l2(&self) {
        self.add_frame_work_order("WO-2000").await;
        self.submit(vec![
            scan(pb::ScanKind::StartOperation, "WO-2000", 10, "ST-10"),
            with_lot(
                scan(pb::ScanKind::Consume, "WO-2000", 0, "ST-10"),
                "STEEL-L2",
                "10",
            ),
            with_lot(
                scan(pb::ScanKind::Produce, "WO-2000", 0, "ST-10"),
                "FRAME-L2",
                "4",
            ),
        ])
        .await;
    }

    pub async fn add_frame_work_order(&self, number: &str) {
        self.master()
            .upsert_work_orders(admin(pb::UpsertWorkOrdersRequest {
                items: vec![pb::WorkOrderSpec {
                    number: number.into(),
                    material: "FRAME-200".into(),
                    planned_quantity: "20".into(),
                    status: "released".into(),
                    operations: vec![pb::OperationSpec {
                        step: 10,
                        station: "ST-10".into(),
                        description: "Welding".into(),
                    }],
                    components: vec![pb::Component {
                        material: "STEEL-500".into(),
                        quantity_per_unit: "2.5".into(),
                    }],
                }],
            }))
            .await
            .expect("work order");
    }

    /// Submits `scans` as op1; every one must be accepted.
    pub async fn submit(&self, scans: Vec<pb::Scan>) {
        let results = self
            .scans()
            .submit_scans(operator(pb::SubmitScansRequest { scans }))
            .await
            .expect("submit scans")
            .into_inner()
            .results;
        for r in &results {
            assert_eq!(
                r.status,
                pb::ScanStatus::Accepted as i32,
                "scan {} not accepted: {:?}",
                r.scan_id,
                r.error
            );
        }
    }

    /// Voids a scan as sup1.
    pub async fn void(&self, scan_id: &str) {
        let mut req = tonic::Request::new(pb::VoidScanRequest {
            scan_id: scan_id.into(),
            reason: "test".into(),
            confirm: true,
        });
        Caller {
            user: "sup1".into(),
            roles: vec!["supervisor".into()],
            device: None,
            station: None,
        }
        .write_to(req.metadata_mut());
        self.scans().void_scan(req).await.expect("void");
    }

    /// The typical run of docs/demo-plant.md, step 1: WO-1000 turns 25 of STEEL-L1 into FRAME-L1.
    pub async fn demo_step_1(&self) {
        self.submit(vec![
            scan(pb::ScanKind::StartOperation, "WO-1000", 10, "ST-10"),
            with_lot(
                scan(pb::ScanKind::Consume, "WO-1000", 10, "ST-10"),
                "STEEL-L1",
                "25",
            ),
            {
                let mut s = with_lot(
                    scan(pb::ScanKind::Produce, "WO-1000", 10, "ST-10"),
                    "FRAME-L1",
                    "10",
                );
                s.material = "FRAME-200".into();
                s
            },
            scan(pb::ScanKind::CompleteOperation, "WO-1000", 10, "ST-10"),
        ])
        .await;
    }

    /// Step 2: FRAME-L1, WHEEL-L1 and BOLT-L1 into serial BIKE-S0001, inspected, completed.
    pub async fn demo_step_2(&self) {
        let into = |lot: &str, q: &str| {
            let mut s = with_lot(scan(pb::ScanKind::Consume, "WO-1001", 10, "ST-20"), lot, q);
            s.into_lot = "BIKE-S0001".into();
            s
        };
        self.submit(vec![
            scan(pb::ScanKind::StartOperation, "WO-1001", 10, "ST-20"),
            into("FRAME-L1", "1"),
            into("WHEEL-L1", "2"),
            into("BOLT-L1", "8"),
            with_lot(
                scan(pb::ScanKind::Produce, "WO-1001", 10, "ST-20"),
                "BIKE-S0001",
                "1",
            ),
            scan(pb::ScanKind::CompleteOperation, "WO-1001", 10, "ST-20"),
            scan(pb::ScanKind::StartOperation, "WO-1001", 20, "ST-30"),
            {
                let mut s = scan(pb::ScanKind::Inspect, "WO-1001", 20, "ST-30");
                s.lot = "BIKE-S0001".into();
                s.result = pb::InspectResult::Pass as i32;
                s
            },
            scan(pb::ScanKind::CompleteOperation, "WO-1001", 20, "ST-30"),
        ])
        .await;
    }

    pub async fn typical_run(&self) {
        self.demo_step_1().await;
        self.demo_step_2().await;
    }

    /// Stops scan-ingest and drops the databases (Redis keys go with the guards).
    pub async fn stop(mut self) {
        self.stop_scan_ingest().await;
    }
}

impl TraceQueryApp {
    pub fn channel(&self) -> Channel {
        lazy_channel(self.port)
    }

    pub fn client(&self) -> TraceQueryClient<Channel> {
        TraceQueryClient::new(self.channel())
    }

    pub async fn genealogy(
        &self,
        lot: &str,
        direction: pb::Direction,
        max_depth: u32,
    ) -> Result<pb::Genealogy, tonic::Status> {
        self.client()
            .get_genealogy(pb::GenealogyRequest {
                lot: lot.into(),
                direction: direction as i32,
                max_depth,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("trace-query did not stop cleanly: {other:?}"),
        }
    }
}

pub use mes_common::testing::{demo_plant, demo_plant_path, lazy_channel, wait_for, with_caller};

pub fn admin<T>(message: T) -> tonic::Request<T> {
    with_caller(message, Caller::system("test-admin"))
}

pub fn operator<T>(message: T) -> tonic::Request<T> {
    with_caller(
        message,
        Caller {
            user: "op1".into(),
            roles: vec!["operator".into()],
            device: None,
            station: None,
        },
    )
}

pub fn scan(kind: pb::ScanKind, work_order: &str, operation: u32, station: &str) -> pb::Scan {
    let now = chrono::Utc::now();
    pb::Scan {
        scan_id: uuid::Uuid::new_v4().to_string(),
        kind: kind as i32,
        work_order: work_order.into(),
        operation,
        station: station.into(),
        scanned_at: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: now.timestamp_subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

pub fn with_lot(mut s: pb::Scan, lot: &str, qty: &str) -> pb::Scan {
    s.lot = lot.into();
    s.quantity = qty.into();
    s
}

/// `(from, to)` pairs of a genealogy's edges, sorted.
pub fn edge_pairs(g: &pb::Genealogy) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = g
        .edges
        .iter()
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    v.sort();
    v
}

/// `(lot, depth)` of a genealogy's nodes.
pub fn node_depths(g: &pb::Genealogy) -> Vec<(String, u32)> {
    g.nodes.iter().map(|n| (n.lot.clone(), n.depth)).collect()
}

/// A throwaway `redis-server` on a free port (no persistence), restartable on that port.
pub struct RedisServer {
    pub port: u16,
    child: Option<tokio::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut s = Self { port, child: None };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) and waits until it accepts connections.
    pub async fn restart(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let port = self.port;
        let up = wait_for(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "redis-server did not start on {port}");
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) it: connections stay open, nothing answers.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }
}

/// The rows of every read-model table, as text, sorted (to compare read models).
pub async fn read_model(pool: &PgPool) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for table in trace_query::store::READ_MODEL_TABLES {
        let sql = format!("SELECT t::text FROM {table} t ORDER BY 1");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await
            .expect("read model table");
        out.push(((*table).to_owned(), rows));
    }
    out
}

pub async fn redis_keys(url: &str, pattern: &str) -> usize {
    let Ok(redis) = mes_common::cache::Redis::connect(url, "", Duration::from_millis(500)).await
    else {
        return 0;
    };
    let n: usize = redis
        .client()
        .custom::<fred::types::Value, _>(fred::cmd!("KEYS"), vec![pattern.to_owned()])
        .await
        .map(|v| v.into_array().len())
        .unwrap_or(0);
    redis.quit().await;
    n
}
