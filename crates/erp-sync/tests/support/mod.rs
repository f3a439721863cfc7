//! The test harness: a real scan-ingest and erp-sync instances started in-process on :0,
//! each test with its own databases (dropped at the end, also when the test fails) and its
//! own Redis prefixes.
// Shared by several test binaries: each uses a part of it.
#![allow(dead_code, unused_imports)]

pub mod erp_double;
pub mod tryton;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mes_common::Shutdown;
use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use mes_proto::v1::erp_sync_client::ErpSyncClient;
use mes_proto::v1::scan_ingest_client::ScanIngestClient;
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
// Channels signing with the test internal key, as the services sign their calls.
use mes_common::testing::Channel;

const PG: &str = "postgres://postgres@127.0.0.1:5432";

use erp_sync::config::{Adapter, FileErp, RestErp, Secret, TrytonErp};
use mes_common::testing::{DbGuard, RedisGuard};

/// One test's world: a scan-ingest, a database for erp-sync instances, a scratch directory.
pub struct TestEnv {
    dir: tempfile::TempDir,
    unique: String,
    scan_ingest_port: u16,
    scan_ingest_shutdown: Shutdown,
    scan_ingest_task: JoinHandle<anyhow::Result<()>>,
    scan_ingest_database_url: String,
    erp_database_url: String,
    // Dropped last, after the services stopped.
    _databases: [DbGuard; 2],
    _redis: [RedisGuard; 2],
}

#[derive(Clone, Default)]
pub struct ErpOptions {
    /// Default: the demo plant.
    pub plant_file: Option<PathBuf>,
    /// Default: `confirmations.jsonl` in the test's directory.
    pub outbox_file: Option<PathBuf>,
    /// 0: only the start-up pull.
    pub pull_interval_seconds: u64,
    /// 0: the default.
    pub breaker_failure_threshold: u32,
    /// 0: the default.
    pub breaker_open_ms: u64,
    /// (initial, max) retry delays in ms; (0, 0): 50 and 1000.
    pub retry_ms: (u64, u64),
    /// Empty: `file`.
    pub adapter: String,
    pub rest_base_url: String,
    pub rest_token: String,
    /// 0: 3000.
    pub call_timeout_ms: u64,
    pub tryton: Option<TrytonOptions>,
    /// Delivery attempts before an outbox row becomes a dead letter; 0: the default.
    pub max_attempts: u32,
    /// Pause of the delivery after the ERP refused erp-sync's credentials, in ms; 0: the default.
    pub auth_retry_ms: u64,
    /// Shortest wait before retrying a row whose call timed out, in ms; 0: 100 (the service's
    /// default, 60 s, would make the tests with slow ERPs wait a minute).
    pub retry_after_timeout_ms: u64,
}

#[derive(Clone, Default)]
pub struct TrytonOptions {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub station: String,
}

pub struct ErpSyncApp {
    pub pool: PgPool,
    pub instance: String,
    port: u16,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestEnv {
    pub async fn new() -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let si_url = format!("{PG}/test_erp_si_{unique}");
        let erp_database_url = format!("{PG}/test_erp_sync_{unique}");
        let databases = [
            DbGuard {
                url: si_url.clone(),
            },
            DbGuard {
                url: erp_database_url.clone(),
            },
        ];
        let redis = [
            RedisGuard {
                url: "redis://127.0.0.1:6379".into(),
                prefix: format!("test:erp-si:{unique}:"),
            },
            RedisGuard {
                url: "redis://127.0.0.1:6379".into(),
                prefix: format!("test:erp-sync:{unique}:"),
            },
        ];
        let mut settings = scan_ingest::Settings::default();
        settings.service.database_url = si_url;
        settings.service.listen_addr = "127.0.0.1:0".into();
        settings.service.metrics_addr = String::new();
        settings.service.redis_prefix = format!("test:erp-si:{unique}:");
        settings.service.shutdown_grace_seconds = 3;
        settings.service.internal_key = mes_common::testing::internal_key();
        let app = scan_ingest::Application::build(settings)
            .await
            .expect("scan-ingest starts");
        let scan_ingest_port = app.port();
        let scan_ingest_shutdown = Shutdown::new();
        let scan_ingest_task = tokio::spawn(app.run_until_stopped(scan_ingest_shutdown.clone()));
        Self {
            scan_ingest_database_url: databases[0].url.clone(),
            dir: tempfile::tempdir().expect("temp dir"),
            unique,
            scan_ingest_port,
            scan_ingest_shutdown,
            scan_ingest_task,
            erp_database_url,
            _databases: databases,
            _redis: redis,
        }
    }

    /// A path in the test's scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write_file(&self, name: &str, value: &Value) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, serde_json::to_vec_pretty(value).expect("json")).expect("write");
        path
    }

    pub fn scan_ingest_client(&self) -> ScanIngestClient<Channel> {
        ScanIngestClient::new(lazy_channel(self.scan_ingest_port))
    }

    /// A pool on the erp-sync database (for bookkeeping the test changes directly).
    pub async fn erp_pool(&self) -> PgPool {
        PgPool::connect(&self.erp_database_url)
            .await
            .expect("erp-sync database")
    }

    /// A pool on scan-ingest's database (to write what scan-ingest's API cannot, e.g. an event
    /// of a kind a newer scan-ingest would write).
    pub async fn scan_ingest_pool(&self) -> PgPool {
        PgPool::connect(&self.scan_ingest_database_url)
            .await
            .expect("scan-ingest database")
    }

    /// The feed's head once scan-ingest sequenced every event committed so far.
    pub async fn feed_head(&self) -> i64 {
        let pool = self.scan_ingest_pool().await;
        let sequenced = wait_for(Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM event_log WHERE position IS NULL")
                .fetch_one(&pool)
                .await
                .expect("event log")
                == 0
        })
        .await;
        assert!(
            sequenced,
            "scan-ingest did not sequence its events within 20 s"
        );
        let head = sqlx::query_scalar("SELECT last_position FROM feed_sequencer WHERE id = 1")
            .fetch_one(&pool)
            .await
            .expect("feed head");
        pool.close().await;
        head
    }

    /// Starts an erp-sync instance on the shared erp-sync database.
    pub async fn spawn_erp_sync(&self, options: ErpOptions) -> ErpSyncApp {
        let mut s = erp_sync::Settings::default();
        s.service.database_url = self.erp_database_url.clone();
        s.service.listen_addr = "127.0.0.1:0".into();
        s.service.metrics_addr = String::new();
        s.service.redis_prefix = format!("test:erp-sync:{}:", self.unique);
        s.service.shutdown_grace_seconds = 3;
        s.service.internal_key = mes_common::testing::internal_key();
        s.scan_ingest_url = format!("http://127.0.0.1:{}", self.scan_ingest_port);
        s.leader_retry_ms = 200;
        s.erp.pull_interval_seconds = options.pull_interval_seconds;
        s.erp.call_timeout_ms = if options.call_timeout_ms > 0 {
            options.call_timeout_ms
        } else {
            3_000
        };
        s.erp.adapter = match options.adapter.as_str() {
            "" | "file" => Adapter::File(FileErp {
                plant_file: options
                    .plant_file
                    .unwrap_or_else(demo_plant_path)
                    .to_string_lossy()
                    .into_owned(),
                outbox_file: options
                    .outbox_file
                    .unwrap_or_else(|| self.path("confirmations.jsonl"))
                    .to_string_lossy()
                    .into_owned(),
            }),
            "rest" => Adapter::Rest(RestErp {
                rest_base_url: options.rest_base_url.clone(),
                rest_token: Secret(options.rest_token.clone()),
            }),
            "tryton" => Adapter::Tryton(match &options.tryton {
                Some(t) => TrytonErp {
                    tryton_url: t.url.clone(),
                    tryton_database: t.database.clone(),
                    tryton_user: t.user.clone(),
                    tryton_password: Secret(t.password.clone()),
                    tryton_station: t.station.clone(),
                    ..TrytonErp::default()
                },
                None => TrytonErp::default(),
            }),
            other => panic!("no erp adapter {other:?}"),
        };
        if options.breaker_failure_threshold > 0 {
            s.erp.breaker_failure_threshold = options.breaker_failure_threshold;
        }
        if options.breaker_open_ms > 0 {
            s.erp.breaker_open_ms = options.breaker_open_ms;
        }
        let (initial, max) = match options.retry_ms {
            (0, 0) => (50, 1_000),
            other => other,
        };
        s.erp.retry_initial_ms = initial;
        s.erp.retry_max_ms = max;
        if options.max_attempts > 0 {
            s.erp.max_attempts = options.max_attempts;
        }
        if options.auth_retry_ms > 0 {
            s.erp.auth_retry_ms = options.auth_retry_ms;
        }
        s.erp.retry_after_timeout_ms = if options.retry_after_timeout_ms > 0 {
            options.retry_after_timeout_ms
        } else {
            100
        };
        let instance = s.instance_id.clone();
        let app = erp_sync::Application::build(s)
            .await
            .expect("erp-sync starts");
        let port = app.port();
        let pool = app.state().pool.clone();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        ErpSyncApp {
            pool,
            instance,
            port,
            shutdown,
            task,
        }
    }

    /// Stops scan-ingest (erp-sync instances are stopped by the test before).
    pub async fn stop(self) {
        self.scan_ingest_shutdown.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.scan_ingest_task).await;
    }
}

impl ErpSyncApp {
    pub fn client(&self) -> ErpSyncClient<Channel> {
        ErpSyncClient::new(lazy_channel(self.port))
    }

    pub fn channel(&self) -> Channel {
        lazy_channel(self.port)
    }

    /// Waits until `n` pulls succeeded (in this instance's database, by any instance).
    pub async fn wait_for_successful_pulls(&self, n: i64) {
        let ok = wait_for(Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pull_runs WHERE status = 'succeeded'",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
                >= n
        })
        .await;
        assert!(ok, "no successful pull within 20 s");
    }

    /// erp-sync's stored feed cursor (0: none yet).
    pub async fn feed_cursor(&self) -> i64 {
        sqlx::query_scalar("SELECT position FROM feed_cursor WHERE consumer = 'erp-sync'")
            .fetch_optional(&self.pool)
            .await
            .expect("feed cursor")
            .unwrap_or(0)
    }

    /// The grpc.health.v1 status of `service` (`Unknown` when it cannot be read).
    pub async fn health(
        &self,
        service: &str,
    ) -> tonic_health::pb::health_check_response::ServingStatus {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        HealthClient::new(self.channel())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status())
            .unwrap_or(ServingStatus::Unknown)
    }

    /// Stops the instance (its jobs stop, its scheduler lock is released).
    pub async fn stop(self) {
        self.shutdown.trigger();
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("erp-sync did not stop cleanly: {other:?}"),
        }
    }
}

pub use mes_common::testing::{demo_plant, demo_plant_path, lazy_channel, wait_for, with_caller};

pub fn admin<T>(message: T) -> tonic::Request<T> {
    with_caller(
        message,
        Caller {
            user: "admin".into(),
            roles: vec!["admin".into()],
            device: None,
            station: None,
        },
    )
}

pub fn supervisor<T>(message: T) -> tonic::Request<T> {
    with_caller(
        message,
        Caller {
            user: "sup1".into(),
            roles: vec!["supervisor".into()],
            device: None,
            station: None,
        },
    )
}

/// Voids `scan_id` in scan-ingest as sup1; returns the void scan's id.
pub async fn void_scan(
    client: &mut ScanIngestClient<Channel>,
    scan_id: &str,
    reason: &str,
) -> String {
    let r = client
        .void_scan(supervisor(pb::VoidScanRequest {
            scan_id: scan_id.into(),
            reason: reason.into(),
            confirm: true,
        }))
        .await
        .expect("void scan")
        .into_inner();
    assert!(r.allowed, "void of {scan_id} refused: {}", r.why);
    assert!(!r.void_scan_id.is_empty());
    r.void_scan_id
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

/// A scan builder.
pub struct Scan(pb::Scan);

impl Scan {
    pub fn new(kind: pb::ScanKind, work_order: &str, operation: u32, station: &str) -> Self {
        let now = chrono::Utc::now();
        Self(pb::Scan {
            scan_id: uuid::Uuid::new_v4().to_string(),
            kind: kind as i32,
            work_order: work_order.into(),
            operation,
            station: station.into(),
            scanned_at: Some(prost_types::Timestamp {
                seconds: now.timestamp(),
                nanos: 0,
            }),
            ..Default::default()
        })
    }

    pub fn lot(mut self, lot: &str) -> Self {
        self.0.lot = lot.into();
        self
    }

    pub fn material(mut self, material: &str) -> Self {
        self.0.material = material.into();
        self
    }

    pub fn quantity(mut self, quantity: &str) -> Self {
        self.0.quantity = quantity.into();
        self
    }

    pub fn defect(mut self, code: &str) -> Self {
        self.0.defect_code = code.into();
        self
    }

    pub fn build(self) -> pb::Scan {
        self.0
    }
}

pub fn scan(kind: pb::ScanKind, work_order: &str, operation: u32, station: &str) -> pb::Scan {
    Scan::new(kind, work_order, operation, station).build()
}

/// Submits `scans` as op1 and checks that every one was accepted.
pub async fn submit_all(client: &mut ScanIngestClient<Channel>, scans: Vec<pb::Scan>) {
    let results = client
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

/// Every JSON line of the file (none when it does not exist).
pub fn all_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

pub fn lines_with_key(path: &Path, key: &str) -> Vec<Value> {
    all_lines(path)
        .into_iter()
        .filter(|l| l["idempotency_key"] == key)
        .collect()
}

/// grpc.health.v1 reports SERVING for `mes.v1.ErpSync`, and reflection lists the service.
pub async fn assert_serving_with_reflection(app: &ErpSyncApp) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let mut health = HealthClient::new(app.channel());
    let serving = wait_for(Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "mes.v1.ErpSync".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
        }
    })
    .await;
    assert!(serving, "erp-sync reports SERVING");
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(app.channel());
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer");
    };
    assert!(list.service.iter().any(|s| s.name == "mes.v1.ErpSync"));
}
