//! The scheduler's lease (`erp_leader`): a fencing token that grows by one each time a replica
//! takes the scheduler's advisory lock. The lock decides who leads; the token lets the database
//! refuse a leader that was deposed (its lock connection died, it was paused, partitioned)
//! and still believes it leads: every outbox change and ERP write of the delivery, and every
//! batch of the feed consumer, runs in a transaction that first checks the token it holds
//! against the current one, under a shared row lock. Taking the lease updates that row, so it
//! waits for the in-flight checked transactions of the old leader (each bounded by the ERP
//! call timeout) and every later check of the old leader fails.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Another replica took the lease after this one: it must not write.
    #[error("fenced: this replica holds lease token {held}, the current one is {current}")]
    Fenced { held: i64, current: i64 },
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

/// Takes the lease after winning the advisory lock: the new, larger fencing token.
pub async fn take(pool: &PgPool, holder: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE erp_leader SET token = token + 1, holder = $1, acquired_at = now()
         WHERE id = 1 RETURNING token",
    )
    .bind(holder)
    .fetch_one(pool)
    .await
}

/// The current token (0: nobody took the lease yet).
pub async fn current(pool: &PgPool) -> Result<i64, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT token FROM erp_leader WHERE id = 1")
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}

/// Checks in `conn`'s transaction that `token` is still the current one, and keeps the lease
/// row share-locked until that transaction ends (a new leader waits for it).
pub async fn check(conn: &mut PgConnection, token: i64) -> Result<(), FenceError> {
    let current: i64 = sqlx::query_scalar("SELECT token FROM erp_leader WHERE id = 1 FOR SHARE")
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
    if current == token {
        Ok(())
    } else {
        metrics::counter!("erp_fenced_total").increment(1);
        Err(FenceError::Fenced {
            held: token,
            current,
        })
    }
}

/// A transaction that holds the lease: begun only while `token` is current; a stalled holder
/// is cut off by the server after `hold_for` idle in the transaction (its commit then fails).
pub struct Fenced {
    tx: Transaction<'static, Postgres>,
}

impl Fenced {
    pub async fn begin(pool: &PgPool, token: i64, hold_for: Duration) -> Result<Self, FenceError> {
        let mut tx = pool.begin().await?;
        let ms = hold_for.as_millis().clamp(1_000, i32::MAX as u128);
        sqlx::query("SELECT set_config('idle_in_transaction_session_timeout', $1, true)")
            .bind(ms.to_string())
            .execute(&mut *tx)
            .await?;
        check(&mut tx, token).await?;
        Ok(Self { tx })
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}
