//! What every gRPC service runs beside its server: dependency health, pool gauges and the
//! `/metrics` listener; and the orderly stop after the server returned.

use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic_health::server::HealthReporter;

use crate::cache::Redis;
use crate::health::Probe;
use crate::{Shutdown, db};

/// The probes every service has: its database (decides SERVING) and Redis (reported only: a
/// cache outage degrades, it does not stop the service).
pub fn core_probes(pool: &PgPool, redis: &Redis) -> Vec<Probe> {
    let pool = pool.clone();
    let redis = redis.clone();
    vec![
        Probe::new("database", true, move || {
            let pool = pool.clone();
            async move { db::ping(&pool).await }
        }),
        Probe::new("redis", false, move || {
            let redis = redis.clone();
            async move { redis.ping().await }
        }),
    ]
}

/// Spawns into `tasks`: the health watch publishing `probes` for `grpc_services`, the pool
/// gauges, and the `/metrics` listener when there is one.
pub fn spawn_common_tasks(
    tasks: &mut JoinSet<()>,
    reporter: HealthReporter,
    grpc_services: Vec<&'static str>,
    probes: Vec<Probe>,
    pool: &PgPool,
    metrics_listener: Option<TcpListener>,
    shutdown: &Shutdown,
) {
    tasks.spawn(crate::health::watch(
        reporter,
        grpc_services,
        probes,
        Duration::from_secs(2),
        shutdown.clone(),
    ));
    let pool = pool.clone();
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
    if let Some(listener) = metrics_listener {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, stop).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
}

/// After the server returned: stops the background tasks (waiting at most `grace`), then
/// closes the Redis client and the pool.
pub async fn stop(
    mut tasks: JoinSet<()>,
    grace: Duration,
    shutdown: &Shutdown,
    redis: &Redis,
    pool: &PgPool,
) {
    shutdown.trigger();
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    redis.quit().await;
    pool.close().await;
}

/// What every gRPC service connects and binds at start-up.
pub struct Infra {
    pub pool: PgPool,
    pub redis: Redis,
    pub listener: TcpListener,
    pub metrics_listener: Option<TcpListener>,
}

impl Infra {
    /// Checks the internal key (required outside demo mode, see
    /// [`crate::ServiceSettings::validate_internal_key`]), creates and migrates the service's
    /// database (waiting up to a minute for PostgreSQL),
    /// connects Redis (without waiting for it) and binds the listeners (port 0 picks a free one).
    pub async fn connect(
        s: &crate::ServiceSettings,
        migrator: &sqlx::migrate::Migrator,
    ) -> anyhow::Result<Self> {
        // Outside demo mode, no start without the internal key.
        s.validate_internal_key()?;
        let pool = db::prepare(
            &s.database_url,
            s.database_max_connections,
            migrator,
            Duration::from_secs(60),
        )
        .await?;
        let redis = Redis::connect(&s.redis_url, &s.redis_prefix, Duration::from_secs(2)).await?;
        let listener = crate::grpc::bind(&s.listen_addr).await?;
        let metrics_listener = if s.metrics_addr.is_empty() {
            None
        } else {
            Some(crate::grpc::bind(&s.metrics_addr).await?)
        };
        Ok(Self {
            pool,
            redis,
            listener,
            metrics_listener,
        })
    }
}
