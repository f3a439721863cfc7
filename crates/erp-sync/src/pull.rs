//! Inbound sync: pulls master data from the ERP and upserts it into scan-ingest in dependency
//! order (materials → stations → received lots → work orders).
//!
//! Every record is checked against the contract first; departures are counted
//! (`erp_contract_drift_total{entity,kind}`), logged and recorded, and unusable records go to
//! the dead-letter table while the rest of the sync continues. Records scan-ingest refuses
//! are retried one by one, so one bad record never blocks its batch.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;

use crate::adapter::{AdapterError, ErpAdapter, Pulled};
use crate::contract::{Drift, DriftKind};
use crate::domain::Entity;
use crate::mes::{self, Mes};
use crate::store::inbound::{self, Counts};

/// Records per upsert call.
const CHUNK: usize = 500;

/// Why a pull runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first pull of a replica that became the scheduler.
    Startup,
    /// Every `pull_interval_seconds`.
    Scheduled,
    /// `ErpSync.TriggerPull`.
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Scheduled => "scheduled",
            Trigger::Manual => "manual",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Erp(#[from] AdapterError),
    #[error("scan-ingest refused or failed the upsert: {0}")]
    Mes(tonic::Status),
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

/// What a pull did, per entity and in total.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullReport {
    pub entities: Vec<(Entity, Counts)>,
    pub total: Counts,
}

pub struct Puller {
    pool: PgPool,
    adapter: Arc<dyn ErpAdapter>,
    mes: Mes,
    instance: String,
    call_timeout: Duration,
    /// One pull at a time in this replica (scheduled and manual pulls queue up).
    running: tokio::sync::Mutex<()>,
}

impl Puller {
    pub fn new(
        pool: PgPool,
        adapter: Arc<dyn ErpAdapter>,
        mes: Mes,
        instance: String,
        call_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            adapter,
            mes,
            instance,
            call_timeout,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs one pull of every entity and records it in `pull_runs`.
    #[tracing::instrument(
        name = "erp.pull",
        skip(self),
        fields(trigger = trigger.as_str(), instance = %self.instance)
    )]
    pub async fn run(&self, trigger: Trigger) -> Result<PullReport, SyncError> {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let run_id = inbound::start_run(&self.pool, &self.instance, trigger.as_str()).await?;
        let result = self.pull_all().await;
        let (counts, error) = match &result {
            Ok(report) => (report.total, None),
            Err(e) => (Counts::default(), Some(format!("{e}"))),
        };
        if let Err(e) = inbound::finish_run(&self.pool, run_id, counts, error.as_deref()).await {
            tracing::warn!(error = %e, run = run_id, "cannot record the end of a pull run");
        }
        let outcome = if result.is_ok() {
            "succeeded"
        } else {
            "failed"
        };
        metrics::counter!("erp_pull_runs_total", "trigger" => trigger.as_str(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("erp_pull_duration_seconds").record(started.elapsed().as_secs_f64());
        match &result {
            Ok(r) => tracing::info!(
                created = r.total.created,
                updated = r.total.updated,
                unchanged = r.total.unchanged,
                rejected = r.total.rejected,
                "pull finished"
            ),
            Err(e) => tracing::warn!(error = %e, "pull failed"),
        }
        result
    }

    async fn pull_all(&self) -> Result<PullReport, SyncError> {
        let mut report = PullReport::default();
        for entity in Entity::ALL {
            let since = inbound::cursor(&self.pool, entity).await?;
            let since = since.as_deref();
            let counts = match entity {
                Entity::Materials => {
                    let pulled = self.call(self.adapter.pull_materials(since)).await?;
                    self.sync(entity, pulled, |items| self.mes.upsert_materials(items))
                        .await?
                }
                Entity::Stations => {
                    let pulled = self.call(self.adapter.pull_stations(since)).await?;
                    self.sync(entity, pulled, |items| self.mes.upsert_stations(items))
                        .await?
                }
                Entity::Lots => {
                    let pulled = self.call(self.adapter.pull_received_lots(since)).await?;
                    self.sync(entity, pulled, |items| self.mes.upsert_received_lots(items))
                        .await?
                }
                Entity::WorkOrders => {
                    let pulled = self.call(self.adapter.pull_work_orders(since)).await?;
                    self.sync(entity, pulled, |items| self.mes.upsert_work_orders(items))
                        .await?
                }
            };
            report.total.add(counts);
            report.entities.push((entity, counts));
        }
        Ok(report)
    }

    /// An ERP call with the per-call timeout.
    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, AdapterError>>,
    ) -> Result<T, AdapterError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(AdapterError::Timeout(self.call_timeout.as_millis() as u64)),
        };
        metrics::histogram!("erp_call_duration_seconds", "call" => "pull")
            .record(started.elapsed().as_secs_f64());
        if let Err(AdapterError::Unreadable(m)) = &result {
            record_drift_metric("plant", DriftKind::Unreadable);
            tracing::warn!(error = %m, kind = "unreadable", "erp contract drift");
        }
        result
    }

    /// Checks, dead-letters and upserts one entity's records, then saves its cursor.
    async fn sync<T, F, Fut>(
        &self,
        entity: Entity,
        pulled: Pulled<T>,
        upsert: F,
    ) -> Result<Counts, SyncError>
    where
        T: Clone,
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Result<Counts, tonic::Status>>,
    {
        let mut counts = Counts::default();
        for note in &pulled.notes {
            self.drift(entity, "", note).await;
        }
        let mut usable: Vec<(String, Value, T)> = Vec::new();
        for item in pulled.items {
            for d in &item.drifts {
                self.drift(entity, &item.key, d).await;
            }
            match item.record {
                Some(record) => usable.push((item.key, item.payload, record)),
                None => {
                    let rejecting: Vec<&Drift> =
                        item.drifts.iter().filter(|d| d.kind.rejects()).collect();
                    let kind = rejecting
                        .first()
                        .map_or(DriftKind::InvalidValue, |d| d.kind);
                    let reason = rejecting
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.dead_letter(entity, &item.key, kind, &reason, &item.payload)
                        .await?;
                    counts.rejected += 1;
                }
            }
        }
        for chunk in usable.chunks(CHUNK) {
            let records = chunk.iter().map(|(_, _, r)| r.clone()).collect();
            match upsert(records).await {
                Ok(c) => counts.add(c),
                Err(status) if mes::is_record_rejection(&status) => {
                    // Find the records scan-ingest refuses: one at a time.
                    for (key, payload, record) in chunk {
                        match upsert(vec![record.clone()]).await {
                            Ok(c) => counts.add(c),
                            Err(s) if mes::is_record_rejection(&s) => {
                                let drift = Drift {
                                    kind: DriftKind::RejectedByMes,
                                    field: String::new(),
                                    message: s.message().to_owned(),
                                };
                                self.drift(entity, key, &drift).await;
                                self.dead_letter(
                                    entity,
                                    key,
                                    DriftKind::RejectedByMes,
                                    s.message(),
                                    payload,
                                )
                                .await?;
                                counts.rejected += 1;
                            }
                            Err(s) => return Err(SyncError::Mes(s)),
                        }
                    }
                }
                Err(status) => return Err(SyncError::Mes(status)),
            }
        }
        inbound::save_cursor(&self.pool, entity, pulled.cursor.as_deref(), counts).await?;
        Ok(counts)
    }

    async fn dead_letter(
        &self,
        entity: Entity,
        key: &str,
        kind: DriftKind,
        reason: &str,
        payload: &Value,
    ) -> Result<(), sqlx::Error> {
        metrics::counter!("erp_dead_letters_total", "entity" => entity.as_str()).increment(1);
        tracing::warn!(entity = entity.as_str(), record = %key, kind = kind.as_str(), reason = %reason,
            "erp record dead-lettered");
        inbound::dead_letter(
            &self.pool,
            entity.as_str(),
            key,
            kind.as_str(),
            reason,
            payload,
        )
        .await
    }

    /// Counts, logs and records one departure from the contract.
    async fn drift(&self, entity: Entity, key: &str, drift: &Drift) {
        record_drift_metric(entity.as_str(), drift.kind);
        tracing::warn!(entity = entity.as_str(), record = %key, kind = drift.kind.as_str(),
            field = %drift.field, message = %drift.message, "erp contract drift");
        let field = generic_path(&drift.field);
        if let Err(e) = inbound::note_drift(
            &self.pool,
            entity.as_str(),
            drift.kind.as_str(),
            &field,
            key,
            &drift.message,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot record contract drift");
        }
    }
}

fn record_drift_metric(entity: &'static str, kind: DriftKind) {
    metrics::counter!("erp_contract_drift_total", "entity" => entity, "kind" => kind.as_str())
        .increment(1);
}

/// `operations[3].step` → `operations[].step`: one drift record per field, not per index.
fn generic_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// The start-up pull (retried with backoff until scan-ingest and the ERP answer), then one
/// pull every `interval` (none when zero), until `stop` resolves.
pub async fn schedule(puller: Arc<Puller>, interval: Duration, stop: mes_common::Shutdown) {
    let mut attempt = 0;
    loop {
        match puller.run(Trigger::Startup).await {
            Ok(_) => break,
            Err(e) => {
                attempt += 1;
                let delay = crate::breaker::backoff(
                    attempt,
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                );
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64,
                    "start-up pull failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait() => return,
                }
            }
        }
    }
    if interval.is_zero() {
        stop.wait().await;
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait() => return,
        }
        // Failures are recorded and logged by `run`; the next tick tries again.
        let _ = puller.run(Trigger::Scheduled).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lose_their_indexes() {
        assert_eq!(generic_path("operations[12].step"), "operations[].step");
        assert_eq!(generic_path("material"), "material");
        assert_eq!(generic_path(""), "");
    }
}
