//! SQL of erp-sync's own database (migrations in `migrations/`).
//!
//! - [`inbound`]: sync cursors, pull runs, dead letters and contract-drift records.
//! - [`outbound`]: the feed cursor, production scans and the confirmation outbox.
//! - [`reconciliations`]: reconciliation reports.
//! - [`lease`]: the scheduler's fencing token.

pub mod inbound;
pub mod lease;
pub mod outbound;
pub mod reconciliations;

use sqlx::PgPool;

/// A small shared fact (`erp_state`), e.g. the breaker state as the delivering replica sees it.
pub async fn set_state(pool: &PgPool, key: &str, value: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO erp_state (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
    )
    .bind(key)
    .bind(value)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn get_state(pool: &PgPool, key: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM erp_state WHERE key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
}
