//! Inbound sync: pulls master data from the ERP and upserts it into scan-ingest in dependency
//! order (materials → stations → received lots → work orders).
//!
//! Every record is checked against the contract first; departures are counted
//! (`erp_contract_drift_total{entity,kind}`), logged and recorded, and unusable records go to
//! the dead-letter table while the rest of the sync continues. Records scan-ingest refuses
//! are retried one by one, so one bad record never blocks its batch.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;

use crate::adapter::{AdapterError, ErpAdapter, Pulled};
use crate::contract::{self, Checked, Drift, DriftKind};
use crate::domain::Entity;
use crate::mes::{self, Mes};
use crate::store::inbound::{self, Counts, DeadLetter};
use crate::store::outbound;

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

/// What a replay of dead letters did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub replayed: u32,
    pub still_failing: u32,
    /// One line per dead letter not replayed, and why.
    pub errors: Vec<String>,
    /// Outbox rows put back into the delivery queue.
    pub requeued: u32,
}

/// The ERP's current payload of each record of one entity, by key (`None`: the ERP could not
/// be asked; the stored payloads are replayed then).
type Fresh = HashMap<Entity, Option<HashMap<String, Value>>>;

fn payloads<T>(pulled: Pulled<T>) -> HashMap<String, Value> {
    pulled
        .items
        .into_iter()
        .map(|c| (c.key, c.payload))
        .collect()
}

fn entity_named(name: &str) -> Option<Entity> {
    Entity::ALL.into_iter().find(|e| e.as_str() == name)
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

    /// Replays dead letters (one replay or pull at a time in this replica). Inbound ones go
    /// through the contract check and the upsert again, with the ERP's current version of the
    /// record when it still has it (the fix is usually made in the ERP), else the stored
    /// payload; outbound ones (entity `outbox`) go back into the delivery queue. Replayed ones
    /// are marked resolved by `by`; the others keep this attempt's reason.
    #[tracing::instrument(name = "erp.replay_dead_letters", skip_all, fields(letters = letters.len()))]
    pub async fn replay(
        &self,
        letters: Vec<DeadLetter>,
        by: &str,
    ) -> Result<ReplayReport, SyncError> {
        let _one_at_a_time = self.running.lock().await;
        let mut report = ReplayReport::default();
        let mut fresh = Fresh::new();
        for letter in letters {
            let outcome = if letter.entity == crate::delivery::OUTBOX_ENTITY {
                match self.requeue(&letter).await? {
                    Ok(()) => {
                        report.requeued += 1;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else if let Some(entity) = entity_named(&letter.entity) {
                if let std::collections::hash_map::Entry::Vacant(slot) = fresh.entry(entity) {
                    slot.insert(self.current_payloads(entity).await);
                }
                let payload = fresh
                    .get(&entity)
                    .and_then(Option::as_ref)
                    .and_then(|m| m.get(&letter.record_key))
                    .unwrap_or(&letter.payload)
                    .clone();
                self.replay_record(entity, &payload).await?
            } else {
                Err(format!("unknown entity {:?}", letter.entity))
            };
            match outcome {
                Ok(()) => {
                    inbound::resolve_dead_letter(&self.pool, letter.id, by).await?;
                    metrics::counter!("erp_dead_letters_replayed_total", "outcome" => "replayed")
                        .increment(1);
                    tracing::info!(id = letter.id, entity = %letter.entity,
                        record = %letter.record_key, "dead letter replayed");
                    report.replayed += 1;
                }
                Err(reason) => {
                    inbound::note_replay_failure(&self.pool, letter.id, &reason).await?;
                    metrics::counter!("erp_dead_letters_replayed_total", "outcome" => "still_failing")
                        .increment(1);
                    tracing::warn!(id = letter.id, entity = %letter.entity,
                        record = %letter.record_key, reason = %reason, "dead letter still failing");
                    report.still_failing += 1;
                    report.errors.push(format!(
                        "dead letter {} ({} {}): {reason}",
                        letter.id, letter.entity, letter.record_key
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Puts a refused outbox row back into the queue (`Ok` also when it is queued or delivered
    /// already: nothing is left to replay then).
    async fn requeue(&self, letter: &DeadLetter) -> Result<Result<(), String>, SyncError> {
        if outbound::requeue_failed(&self.pool, &letter.record_key).await? {
            return Ok(Ok(()));
        }
        let status = outbound::status_of(&self.pool, &letter.record_key).await?;
        Ok(match status {
            Some(_) => Ok(()),
            None => Err(format!("no outbox row with key {}", letter.record_key)),
        })
    }

    /// The ERP's current records of `entity`, by key (`None` when it cannot be asked now).
    async fn current_payloads(&self, entity: Entity) -> Option<HashMap<String, Value>> {
        let result = match entity {
            Entity::Materials => self
                .call(self.adapter.pull_materials(None))
                .await
                .map(payloads),
            Entity::Stations => self
                .call(self.adapter.pull_stations(None))
                .await
                .map(payloads),
            Entity::Lots => self
                .call(self.adapter.pull_received_lots(None))
                .await
                .map(payloads),
            Entity::WorkOrders => self
                .call(self.adapter.pull_work_orders(None))
                .await
                .map(payloads),
        };
        match result {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(entity = entity.as_str(), error = %e,
                    "cannot read the erp's current records; replaying the stored payloads");
                None
            }
        }
    }

    /// Checks one record against the contract and upserts it. `Ok(Err(reason))`: the record
    /// is still unusable; `Err`: scan-ingest or the database failed (the replay stops).
    async fn replay_record(
        &self,
        entity: Entity,
        payload: &Value,
    ) -> Result<Result<(), String>, SyncError> {
        match entity {
            Entity::Materials => {
                self.check_and_upsert(payload, contract::material, |r| {
                    self.mes.upsert_materials(r)
                })
                .await
            }
            Entity::Stations => {
                self.check_and_upsert(payload, contract::station, |r| self.mes.upsert_stations(r))
                    .await
            }
            Entity::Lots => {
                self.check_and_upsert(payload, contract::received_lot, |r| {
                    self.mes.upsert_received_lots(r)
                })
                .await
            }
            Entity::WorkOrders => {
                self.check_and_upsert(payload, contract::work_order, |r| {
                    self.mes.upsert_work_orders(r)
                })
                .await
            }
        }
    }

    async fn check_and_upsert<T, F, Fut>(
        &self,
        payload: &Value,
        check: fn(&Value, usize) -> Checked<T>,
        upsert: F,
    ) -> Result<Result<(), String>, SyncError>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Result<Counts, tonic::Status>>,
    {
        let checked = check(payload, 0);
        let Some(record) = checked.record else {
            let reason = checked
                .drifts
                .iter()
                .filter(|d| d.kind.rejects())
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            return Ok(Err(reason));
        };
        match upsert(vec![record]).await {
            Ok(_) => Ok(Ok(())),
            Err(s) if mes::is_record_rejection(&s) => Ok(Err(format!(
                "{}: {}",
                DriftKind::RejectedByMes,
                s.message()
            ))),
            Err(s) => Err(SyncError::Mes(s)),
        }
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
