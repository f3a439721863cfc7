//! trace-query: answers traceability and report queries from a read model built from
//! scan-ingest's event feed, without touching the write path.
//!
//! - [`config`]: settings (defaults → TOML → `MES_TRACE_QUERY_` environment).
//! - [`api`]: the gRPC surface (`TraceQuery`).
//! - [`error`]: the service's errors and their gRPC status.
//!
//! Migrations of its own database are in `migrations/` and run at start-up.

pub mod api;
pub mod config;
pub mod error;

use std::sync::Arc;
use std::time::Duration;

use mes_common::cache::Redis;
use mes_common::health::Probe;
use mes_common::{Shutdown, db, grpc};
use mes_proto::v1::trace_query_server::TraceQueryServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub redis: Redis,
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
        let pool = db::prepare(
            &s.database_url,
            s.database_max_connections,
            &MIGRATOR,
            Duration::from_secs(60),
        )
        .await?;
        let redis = Redis::connect(&s.redis_url, &s.redis_prefix, Duration::from_secs(2)).await?;
        let listener = grpc::bind(&s.listen_addr).await?;
        let metrics_listener = if s.metrics_addr.is_empty() {
            None
        } else {
            Some(grpc::bind(&s.metrics_addr).await?)
        };
        Ok(Self {
            listener,
            metrics_listener,
            state: AppState {
                pool,
                redis,
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
        let pool = state.pool.clone();
        let redis = state.redis.clone();
        let probes = vec![
            Probe::new("database", true, move || {
                let pool = pool.clone();
                async move { db::ping(&pool).await }
            }),
            // The query cache is optional: without Redis the service answers from PostgreSQL.
            Probe::new("redis", false, move || {
                let redis = redis.clone();
                async move { redis.ping().await }
            }),
        ];
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(mes_common::health::watch(
            reporter,
            vec!["mes.v1.TraceQuery"],
            probes,
            Duration::from_secs(2),
            shutdown.clone(),
        ));
        let pool = state.pool.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                db::record_pool_metrics(&pool);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.wait() => return,
                }
            }
        });
        if let Some(l) = metrics_listener {
            let stop = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = mes_common::metrics::serve(l, stop).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            });
        }

        let api = api::Api::new(state.clone());
        let result = grpc::server("trace-query")
            .add_service(health_service)
            .add_service(grpc::reflection()?)
            .add_service(TraceQueryServer::new(api))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.wait())
            .await;
        shutdown.trigger();
        let drain = Duration::from_secs(settings.service.shutdown_grace_seconds);
        let _ =
            tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        state.redis.quit().await;
        state.pool.close().await;
        tracing::info!("trace-query stopped");
        Ok(result?)
    }
}
