//! trace-query: answers traceability and report queries from a read model built from
//! scan-ingest's event feed, without touching the write path.
//!
//! - [`config`]: settings (defaults → TOML → `MES_TRACE_QUERY_` environment).
//! - [`api`]: the gRPC surface (`TraceQuery`).
//! - [`reads`]: each answer through the cache, the database behind it.
//! - [`domain`]: request validation and the definitions behind the answers (no SQL, no Redis).
//! - [`projection`]: the event-feed consumer that keeps the read model current.
//! - [`store`]: SQL of its own database: applying events, the read queries.
//! - [`cache`]: the Redis query cache (cache-aside, single-flight, locks, membership filter).
//! - [`stats`]: counters behind the metrics.
//! - [`error`]: the service's errors and their gRPC status.
//!
//! Migrations of its own database are in `migrations/` and run at start-up.

pub mod api;
pub mod cache;
pub mod config;
pub mod domain;
pub mod error;
pub mod projection;
pub mod reads;
pub mod stats;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use mes_common::cache::Redis;
use mes_common::{Shutdown, grpc};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub use config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The gRPC health service name that reports the query cache: SERVING while Redis is in use,
/// NOT_SERVING while answers come from PostgreSQL only (degraded; the service itself stays
/// SERVING).
pub const REDIS_HEALTH: &str = "redis";

/// The gRPC health service name that reports the feed consumer: NOT_SERVING while it is
/// stopped in front of an event it cannot apply (answers are then stale; the service itself
/// stays SERVING).
pub const FEED_HEALTH: &str = "feed";

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub redis: Redis,
    pub cache: cache::QueryCache,
    pub projection: projection::Projection,
    pub stats: Arc<stats::Stats>,
    pub settings: Arc<Settings>,
}

/// Mirrors the query cache's state as the health service [`REDIS_HEALTH`], and the feed
/// consumer's as [`FEED_HEALTH`].
async fn cache_health(
    reporter: tonic_health::server::HealthReporter,
    state: AppState,
    shutdown: Shutdown,
) {
    let status = |ok: bool| {
        if ok {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        }
    };
    let (mut last_cache, mut last_feed) = (None, None);
    loop {
        let up = state.cache.redis_available();
        if last_cache != Some(up) {
            reporter.set_service_status(REDIS_HEALTH, status(up)).await;
            last_cache = Some(up);
        }
        let flowing = state.projection.stalled().is_none();
        if last_feed != Some(flowing) {
            reporter
                .set_service_status(FEED_HEALTH, status(flowing))
                .await;
            last_feed = Some(flowing);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.wait() => return,
        }
    }
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
        let settings = Arc::new(settings);
        let stats = Arc::new(stats::Stats::default());
        let cache =
            cache::QueryCache::new(redis.clone(), pool.clone(), stats.clone(), settings.clone());
        let projection =
            projection::Projection::new(pool.clone(), cache.clone(), settings.clone())?;
        Ok(Self {
            listener,
            metrics_listener,
            state: AppState {
                pool,
                redis,
                cache,
                projection,
                stats,
                settings,
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

    /// Serves until `shutdown` fires, then drains in-flight requests.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            state,
        } = self;
        let settings = state.settings.clone();
        tracing::info!(addr = %listener.local_addr()?, "trace-query listening");

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(cache_health(
            reporter.clone(),
            state.clone(),
            shutdown.clone(),
        ));
        // Database (decides SERVING) and Redis (reported only: without it the service answers
        // from PostgreSQL), pool gauges, `/metrics`.
        mes_common::service::spawn_common_tasks(
            &mut tasks,
            reporter,
            vec!["mes.v1.TraceQuery"],
            mes_common::service::core_probes(&state.pool, &state.redis),
            &state.pool,
            metrics_listener,
            &shutdown,
        );
        tasks.spawn(state.projection.clone().follow(shutdown.clone()));
        tasks.spawn(state.cache.clone().watchdog(shutdown.clone()));

        let api = api::Api::new(state.clone());
        let result = grpc::server("trace-query", settings.service.caller_key())
            .add_routes(grpc::standard_services(health_service)?)
            .add_service(api.service())
            .serve_with_incoming_shutdown(grpc::incoming(listener), shutdown.wait())
            .await;
        // The consumer finishes its batch (and its cache deletions), the delayed second
        // deletions run, then Redis and the pool close.
        shutdown.trigger();
        let grace = Duration::from_secs(settings.service.shutdown_grace_seconds);
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        let second_delete = Duration::from_millis(settings.cache_second_delete_ms + 200);
        let deadline = tokio::time::Instant::now() + second_delete.min(grace);
        while !state.cache.settled() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        state.cache.close();
        mes_common::service::stop(tasks, grace, &shutdown, &state.redis, &state.pool).await;
        tracing::info!("trace-query stopped");
        Ok(result?)
    }
}
