//! PostgreSQL: each service owns one database, created if missing and migrated at start-up.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};

/// Creates the database named in `url` when it does not exist (connecting to `postgres`).
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url).context("invalid database url")?;
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    // The name is an identifier (no bind parameter exists for it): allow a safe alphabet only.
    anyhow::ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "database name {name:?} must be letters, digits, '_' or '-'"
    );
    let mut conn = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .context("connecting to postgres")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let sql = format!("CREATE DATABASE \"{name}\"");
        if let Err(e) = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await {
            // Another replica may have created it at the same moment.
            let raced = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505");
            if !raced {
                return Err(e).context("creating database");
            }
        }
        tracing::info!(database = %name, "database created");
    }
    conn.close().await.ok();
    Ok(())
}

/// Drops a database (tests clean up after themselves).
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url)?;
    let name = opts.get_database().unwrap_or_default().to_owned();
    anyhow::ensure!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    );
    let mut conn = opts.database("postgres").connect().await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// A lazily connecting pool: start-up never blocks on it, requests wait at most `acquire_timeout`.
pub fn lazy_pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .context("invalid database url")?
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// Creates the database if needed, then runs `migrator`; retries while PostgreSQL is starting
/// (up to `patience`).
pub async fn prepare(
    url: &str,
    max_connections: u32,
    migrator: &sqlx::migrate::Migrator,
    patience: Duration,
) -> anyhow::Result<PgPool> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match ensure_database(url).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %format!("{e:#}"), "database not ready, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
    let pool = lazy_pool(url, max_connections)?;
    migrator.run(&pool).await.context("running migrations")?;
    Ok(pool)
}

/// Pings the database, returning the round-trip time.
pub async fn ping(pool: &PgPool) -> anyhow::Result<Duration> {
    let start = std::time::Instant::now();
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(start.elapsed())
}

/// Exports pool usage as gauges (`db_pool_connections{state}`).
pub fn record_pool_metrics(pool: &PgPool) {
    let size = pool.size() as f64;
    let idle = pool.num_idle() as f64;
    metrics::gauge!("db_pool_connections", "state" => "idle").set(idle);
    metrics::gauge!("db_pool_connections", "state" => "in_use").set(size - idle);
    metrics::gauge!("db_pool_max_connections").set(pool.options().get_max_connections() as f64);
}
