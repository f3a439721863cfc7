//! Only one replica runs the background jobs — the scheduled pull, the feed consumer, the
//! outbox delivery and the scheduled reconciliation — at a time: the one holding a PostgreSQL
//! advisory lock on a dedicated connection. The lock goes away with that connection (crash,
//! network loss, shutdown), and
//! another replica takes over within `leader_retry_ms`. Taking over also takes the lease
//! ([`crate::store::lease`]): a fencing token that the delivery and the feed consumer check on
//! every ERP write and outbox change, so a deposed leader that has not noticed yet (a paused
//! process, a lock connection that died unnoticed) is refused by the database.

use std::sync::Arc;
use std::time::Duration;

use mes_common::Shutdown;
use sqlx::{Connection, PgConnection};

use crate::AppState;
use crate::delivery::Delivery;
use crate::store::lease;

/// The advisory lock key of erp-sync's scheduler (advisory locks are per database).
const LOCK_KEY: i64 = 0x4d45_535f_4552_5031; // "MES_ERP1"

/// How often the holder checks that its lock connection is alive.
const LOCK_CHECK: Duration = Duration::from_secs(5);

/// A held advisory lock (held as long as its connection lives).
pub struct LeaderLock {
    conn: PgConnection,
}

impl LeaderLock {
    /// Takes the lock if no other session holds it.
    pub async fn try_acquire(database_url: &str) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = PgConnection::connect(database_url).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Self { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Resolves when the lock's connection stops answering (the lock may be gone).
    pub async fn lost(&mut self) {
        loop {
            tokio::time::sleep(LOCK_CHECK).await;
            let alive =
                tokio::time::timeout(LOCK_CHECK, sqlx::query("SELECT 1").execute(&mut self.conn))
                    .await;
            if !matches!(alive, Ok(Ok(_))) {
                return;
            }
        }
    }

    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(LOCK_KEY)
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
    }
}

/// Competes for the lock until `shutdown`; while holding it, runs the jobs.
pub async fn run(state: AppState, shutdown: Shutdown) {
    let retry = Duration::from_millis(state.settings.leader_retry_ms.max(50));
    metrics::gauge!("erp_scheduler_leader").set(0.0);
    loop {
        if shutdown.is_triggered() {
            return;
        }
        match LeaderLock::try_acquire(&state.settings.service.database_url).await {
            Ok(Some(lock)) => {
                tracing::info!(instance = %state.settings.instance_id, "this replica runs the erp jobs");
                metrics::gauge!("erp_scheduler_leader").set(1.0);
                lead(&state, lock, &shutdown).await;
                metrics::gauge!("erp_scheduler_leader").set(0.0);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot compete for the scheduler lock"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.wait() => return,
        }
    }
}

async fn lead(state: &AppState, mut lock: LeaderLock, shutdown: &Shutdown) {
    // The lease's fencing token: every outbox change and ERP write below checks it, so this
    // replica cannot write once another one took the lock (and a new token) after it.
    let token = match lease::take(&state.pool, &state.settings.instance_id).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the scheduler lease");
            lock.release().await;
            return;
        }
    };
    tracing::info!(token, "scheduler lease taken");
    metrics::gauge!("erp_scheduler_lease_token").set(token as f64);
    // The jobs stop when shutdown starts or when the lock is lost.
    let stop = Shutdown::new();
    let erp = &state.settings.erp;
    let delivery = Delivery {
        pool: state.pool.clone(),
        adapter: state.adapter.clone(),
        breaker: state.breaker.clone(),
        wake: state.outbox_wake.clone(),
        call_timeout: Duration::from_millis(erp.call_timeout_ms.max(1)),
        retry_initial: Duration::from_millis(erp.retry_initial_ms.max(1)),
        retry_max: Duration::from_millis(erp.retry_max_ms.max(1)),
        max_attempts: erp.max_attempts.max(1),
        auth_retry: Duration::from_millis(erp.auth_retry_ms.max(1)),
        retry_after_timeout: Duration::from_millis(erp.retry_after_timeout_ms),
        token,
    };
    let mut jobs = tokio::task::JoinSet::new();
    jobs.spawn(crate::pull::schedule(
        Arc::clone(&state.puller),
        Duration::from_secs(erp.pull_interval_seconds),
        stop.clone(),
    ));
    jobs.spawn(crate::outbound::follow(
        state.pool.clone(),
        state.mes.clone(),
        state.outbox_wake.clone(),
        token,
        stop.clone(),
    ));
    jobs.spawn(delivery.run(stop.clone()));
    jobs.spawn(crate::reconcile::schedule(
        Arc::clone(&state.reconciler),
        Duration::from_secs(erp.reconcile_interval_seconds),
        stop.clone(),
    ));
    tokio::select! {
        _ = lock.lost() => tracing::warn!("lost the scheduler lock connection; stopping the erp jobs"),
        _ = shutdown.wait() => {}
    }
    stop.trigger();
    // The jobs finish their current step (each is safe to interrupt, but finishing is nicer).
    let grace = Duration::from_secs(state.settings.service.shutdown_grace_seconds.max(1));
    if tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        jobs.abort_all();
    }
    lock.release().await;
}
