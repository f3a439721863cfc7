//! scan-ingest: the system of record for work orders, lots, inventory and scans, and the
//! ordered, gap-free event feed every other service builds on.
//!
//! - [`domain`]: scan validation and the rules of each scan kind (no transport, no SQL).
//! - [`store`]: SQL of this service's own database (migrations in `migrations/`).
//! - [`feed`]: the event sequencer and the `EventFeed.Subscribe` stream.
//! - [`api`]: the gRPC surface (ScanIngest, MasterData, EventFeed).

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod feed;
pub mod group;
pub mod refcache;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use mes_common::cache::Redis;
use mes_common::{Shutdown, grpc};
use mes_proto::v1::{
    event_feed_server::EventFeedServer, master_data_server::MasterDataServer,
    scan_ingest_server::ScanIngestServer,
};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub redis: Redis,
    pub feed: feed::FeedHub,
    pub refcache: refcache::RefCache,
    pub committer: group::GroupCommitter,
    pub settings: Arc<Settings>,
}

pub struct Application {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// Creates and migrates the database, connects Redis and binds the listeners
    /// (port 0 picks a free port).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        mes_common::metrics::install();
        let s = &settings.service;
        let mes_common::service::Infra {
            pool,
            redis,
            listener,
            metrics_listener,
        } = mes_common::service::Infra::connect(s, &MIGRATOR).await?;
        let feed = feed::FeedHub::new(pool.clone());
        let refcache = refcache::RefCache::new(
            redis.clone(),
            Duration::from_secs(settings.reference_cache_ttl_seconds),
        );
        let committer = group::GroupCommitter::start(
            pool.clone(),
            refcache.clone(),
            group::GroupSettings {
                workers: settings.group_commit_workers,
                max_wait: Duration::from_micros(settings.group_commit_max_wait_us),
                max_scans: settings.group_commit_max_scans,
            },
        );
        Ok(Self {
            listener,
            metrics_listener,
            state: AppState {
                pool,
                redis,
                feed,
                refcache,
                committer,
                settings: Arc::new(settings),
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

    /// Serves until `shutdown` fires, then drains in-flight requests and streams.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            state,
        } = self;
        let settings = state.settings.clone();
        tracing::info!(addr = %listener.local_addr()?, "scan-ingest listening");

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let ledger_reporter = reporter.clone();
        let mut tasks = tokio::task::JoinSet::new();
        mes_common::service::spawn_common_tasks(
            &mut tasks,
            reporter,
            vec!["mes.v1.ScanIngest", "mes.v1.MasterData", "mes.v1.EventFeed"],
            mes_common::service::core_probes(&state.pool, &state.redis),
            &state.pool,
            metrics_listener,
            &shutdown,
        );
        tasks.spawn(state.feed.clone().run_sequencer(
            Duration::from_millis(settings.sequencer_interval_ms),
            shutdown.clone(),
        ));
        tasks.spawn(state.feed.clone().run_listener(shutdown.clone()));
        if settings.ledger_check_interval_seconds > 0 {
            tasks.spawn(store::ledger::run_periodically(
                state.pool.clone(),
                Duration::from_secs(settings.ledger_check_interval_seconds),
                ledger_reporter,
                shutdown.clone(),
            ));
        }

        let api = api::Api::new(state.clone(), shutdown.clone());
        let result = grpc::server("scan-ingest", settings.service.caller_key())
            .add_routes(grpc::standard_services(health_service)?)
            .add_service(ScanIngestServer::new(api.clone()))
            .add_service(MasterDataServer::new(api.clone()))
            .add_service(EventFeedServer::new(api))
            .serve_with_incoming_shutdown(grpc::incoming(listener), shutdown.wait())
            .await;
        let grace = Duration::from_secs(settings.service.shutdown_grace_seconds);
        mes_common::service::stop(tasks, grace, &shutdown, &state.redis, &state.pool).await;
        tracing::info!("scan-ingest stopped");
        Ok(result?)
    }
}
