//! erp-sync: the anti-corruption layer between the ERP and the MES.
//!
//! Inbound, it pulls materials, stations, received lots and work orders from the ERP, checks
//! them against the contract (bad records go to a dead-letter table) and upserts them into
//! scan-ingest. Outbound, it follows scan-ingest's event feed, queues a production
//! confirmation when an operation completes (and a reversal when a scan it already confirmed
//! is voided), and delivers the queue to the ERP exactly once on the ERP side, behind retries
//! and a circuit breaker. Dead letters (inbound records, outbound rows the ERP refused) can be
//! replayed by an admin.
//!
//! - [`domain`]: the records moved in and out, and how a confirmation is built.
//! - [`contract`]: the inbound contract check (interface-drift monitoring).
//! - [`adapter`]: the `ErpAdapter` trait and its implementations (`file`, `rest`, `tryton`),
//!   chosen by `erp.adapter` at start-up.
//! - [`mes`]: the scan-ingest client (master-data upserts, event feed).
//! - [`pull`]: the inbound sync; [`outbound`]: feed → outbox; [`delivery`]: outbox → ERP;
//!   [`breaker`]: circuit breaker and backoff.
//! - [`reconcile`]: compares MES and ERP quantities.
//! - [`scheduler`]: the advisory lock that lets one replica run those jobs.
//! - [`store`]: SQL of erp-sync's own database (migrations in `migrations/`).
//! - [`api`]: the gRPC surface (`ErpSync`).

pub mod adapter;
pub mod api;
pub mod breaker;
pub mod config;
pub mod contract;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod mes;
pub mod outbound;
pub mod pull;
pub mod reconcile;
pub mod scheduler;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mes_common::cache::Redis;
use mes_common::health::Probe;
use mes_common::{Shutdown, grpc};
use mes_proto::v1::erp_sync_server::ErpSyncServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The gRPC health service name that reports the feed consumer: NOT_SERVING while it is
/// stopped in front of an event it cannot apply (confirmations of later production wait; the
/// service itself stays SERVING). Read from the database, so every replica reports the
/// leader's consumer. The same name as trace-query's.
pub const FEED_HEALTH: &str = "feed";

/// Mirrors the feed consumer's recorded stall as the health service [`FEED_HEALTH`].
async fn feed_health(
    reporter: tonic_health::server::HealthReporter,
    pool: PgPool,
    shutdown: Shutdown,
) {
    let mut last = None;
    loop {
        match store::outbound::stall(&pool, mes::CALLER).await {
            Ok(stall) => {
                let flowing = stall.is_none();
                if last != Some(flowing) {
                    let status = if flowing {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter.set_service_status(FEED_HEALTH, status).await;
                    last = Some(flowing);
                }
            }
            // The database probe reports that; keep the last known state.
            Err(e) => tracing::debug!(error = %e, "cannot read the feed consumer's state"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// What every request handler and job shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub redis: Redis,
    pub settings: Arc<Settings>,
    pub adapter: Arc<dyn adapter::ErpAdapter>,
    pub mes: mes::Mes,
    pub puller: Arc<pull::Puller>,
    pub reconciler: Arc<reconcile::Reconciler>,
    pub breaker: Arc<Mutex<breaker::Breaker>>,
    /// Woken when confirmations were queued.
    pub outbox_wake: Arc<Notify>,
}

pub struct Application {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// Validates the settings, creates and migrates the database, connects Redis, builds the
    /// adapter and the scan-ingest client (lazily) and binds the listeners (port 0 picks a
    /// free port).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        mes_common::metrics::install();
        let s = &settings.service;
        let mes_common::service::Infra {
            pool,
            redis,
            listener,
            metrics_listener,
        } = mes_common::service::Infra::connect(s, &MIGRATOR).await?;
        let adapter = adapter::from_settings(&settings.erp)?;
        let mes = mes::Mes::new(
            &settings.scan_ingest_url,
            Duration::from_millis(settings.scan_ingest_timeout_ms.max(1)),
            s.caller_key(),
        )?;
        let puller = Arc::new(pull::Puller::new(
            pool.clone(),
            adapter.clone(),
            mes.clone(),
            settings.instance_id.clone(),
            Duration::from_millis(settings.erp.call_timeout_ms.max(1)),
        ));
        let reconciler = Arc::new(reconcile::Reconciler::new(
            pool.clone(),
            adapter.clone(),
            mes.clone(),
            settings.instance_id.clone(),
            Duration::from_millis(settings.erp.call_timeout_ms.max(1)),
        ));
        let breaker = Arc::new(Mutex::new(breaker::Breaker::new(
            settings.erp.breaker_failure_threshold,
            Duration::from_millis(settings.erp.breaker_open_ms),
        )));
        Ok(Self {
            listener,
            metrics_listener,
            state: AppState {
                pool,
                redis,
                settings: Arc::new(settings),
                adapter,
                mes,
                puller,
                reconciler,
                breaker,
                outbox_wake: Arc::new(Notify::new()),
            },
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` fires, then stops the jobs and drains in-flight requests.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            state,
        } = self;
        let settings = state.settings.clone();
        tracing::info!(addr = %listener.local_addr()?, instance = %settings.instance_id,
            adapter = state.adapter.name(), "erp-sync listening");

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let erp = state.adapter.clone();
        let mut probes = mes_common::service::core_probes(&state.pool, &state.redis);
        // The ERP is reported, but does not decide readiness: an ERP outage only fills the outbox.
        probes.push(Probe::new("erp", false, move || {
            let erp = erp.clone();
            async move {
                let start = std::time::Instant::now();
                erp.ping().await?;
                Ok(start.elapsed())
            }
        }));
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(feed_health(
            reporter.clone(),
            state.pool.clone(),
            shutdown.clone(),
        ));
        mes_common::service::spawn_common_tasks(
            &mut tasks,
            reporter,
            vec!["mes.v1.ErpSync"],
            probes,
            &state.pool,
            metrics_listener,
            &shutdown,
        );
        tasks.spawn(scheduler::run(state.clone(), shutdown.clone()));

        let api = api::Api::new(state.clone());
        let result = grpc::server("erp-sync", settings.service.caller_key())
            .add_routes(grpc::standard_services(health_service)?)
            .add_service(ErpSyncServer::new(api))
            .serve_with_incoming_shutdown(grpc::incoming(listener), shutdown.wait())
            .await;
        let grace = Duration::from_secs(settings.service.shutdown_grace_seconds);
        mes_common::service::stop(tasks, grace, &shutdown, &state.redis, &state.pool).await;
        tracing::info!("erp-sync stopped");
        Ok(result?)
    }
}
