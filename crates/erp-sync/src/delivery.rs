//! Outbound, second half: posts the outbox to the ERP in queue order, with the idempotency
//! key, a per-call timeout, exponential backoff with jitter, and a circuit breaker
//! (`erp_breaker_state`: 0 closed, 1 half-open, 2 open). `erp_outbox_depth` is the number of
//! confirmations and reversals waiting. Rows the ERP refuses for good leave the queue and are
//! recorded as dead letters (entity `outbox`), which `ErpSync.ReplayDeadLetters` re-queues.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mes_common::Shutdown;
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::adapter::{AdapterError, ErpAdapter, Posted};
use crate::breaker::{self, Breaker, State};
use crate::domain::{Confirmation, Reversal};
use crate::store::outbound::{OutboxKind, OutboxRow};
use crate::store::{self, inbound, outbound};

/// `entity` of outbound dead letters (outbox rows the ERP refused for good).
pub const OUTBOX_ENTITY: &str = "outbox";

/// What an outbox row asks the ERP to do.
enum Document {
    Confirmation(Confirmation),
    Reversal(Reversal),
}

impl Document {
    fn read(row: &OutboxRow) -> Result<Self, serde_json::Error> {
        Ok(match row.kind {
            OutboxKind::Confirmation => {
                Self::Confirmation(serde_json::from_value(row.payload.clone())?)
            }
            OutboxKind::Reversal => Self::Reversal(serde_json::from_value(row.payload.clone())?),
        })
    }

    fn work_order(&self) -> &str {
        match self {
            Self::Confirmation(c) => &c.work_order,
            Self::Reversal(r) => &r.work_order,
        }
    }
}

/// How often an idle loop looks at the queue (new rows also wake it).
const IDLE_POLL: Duration = Duration::from_secs(2);

/// Key of the breaker state in `erp_state`.
pub const BREAKER_KEY: &str = "breaker";

pub struct Delivery {
    pub pool: PgPool,
    pub adapter: Arc<dyn ErpAdapter>,
    pub breaker: Arc<Mutex<Breaker>>,
    pub wake: Arc<Notify>,
    pub call_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Delivery {
    /// Delivers until `stop`.
    pub async fn run(self, stop: Shutdown) {
        let state = self.breaker_state();
        self.publish_breaker(state).await;
        loop {
            if stop.is_triggered() {
                return;
            }
            let wait = match self.step().await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox delivery cannot reach its database");
                    Some(IDLE_POLL)
                }
            };
            self.publish_depth().await;
            if let Some(wait) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => {}
                    _ = stop.wait() => return,
                }
            }
        }
    }

    fn breaker_state(&self) -> State {
        self.breaker
            .lock()
            .map(|b| b.state())
            .unwrap_or(State::Closed)
    }

    async fn publish_breaker(&self, state: State) {
        metrics::gauge!("erp_breaker_state").set(state.gauge());
        if let Err(e) = store::set_state(&self.pool, BREAKER_KEY, state.as_str()).await {
            tracing::warn!(error = %e, "cannot record the breaker state");
        }
    }

    async fn publish_depth(&self) {
        if let Ok((depth, oldest)) = outbound::depth(&self.pool).await {
            metrics::gauge!("erp_outbox_depth").set(depth as f64);
            metrics::gauge!("erp_outbox_oldest_pending_seconds").set(oldest);
        }
    }

    /// Tries the head of the queue; returns how long to wait before the next step (`None`:
    /// go on at once).
    async fn step(&self) -> Result<Option<Duration>, sqlx::Error> {
        let Some(row) = outbound::next_pending(&self.pool).await? else {
            return Ok(Some(IDLE_POLL));
        };
        let now = chrono::Utc::now();
        if row.next_attempt_at > now {
            let wait = (row.next_attempt_at - now).to_std().unwrap_or(IDLE_POLL);
            return Ok(Some(wait));
        }
        let document = match Document::read(&row) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(idempotency_key = %row.idempotency_key, error = %e,
                    "unreadable outbox row; set aside");
                self.set_aside(
                    &row,
                    "unreadable_payload",
                    &format!("unreadable payload: {e}"),
                )
                .await?;
                return Ok(None);
            }
        };

        let before = self.breaker_state();
        let allowed = match self.breaker.lock() {
            Ok(mut b) => {
                if b.allow(Instant::now()) {
                    Ok(())
                } else {
                    Err(b.retry_at())
                }
            }
            Err(_) => Ok(()),
        };
        if let Err(retry_at) = allowed {
            let wait = retry_at
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(IDLE_POLL)
                .max(Duration::from_millis(10));
            return Ok(Some(wait));
        }
        let during = self.breaker_state();
        if during != before {
            tracing::info!(
                breaker = during.as_str(),
                "erp breaker half-open: trying one call"
            );
            self.publish_breaker(during).await;
        }

        let span = tracing::info_span!("erp.post_confirmation",
            idempotency_key = %row.idempotency_key, work_order = %document.work_order(),
            kind = row.kind.as_str(), attempt = row.attempts + 1, otel.kind = "client");
        if !row.traceparent.is_empty() {
            // The asynchronous hop joins the trace of the scan that completed the operation.
            mes_common::propagation::set_parent(
                &span,
                mes_common::propagation::context_from_traceparent(&row.traceparent),
            );
        }
        let started = Instant::now();
        let post = async {
            match &document {
                Document::Confirmation(c) => {
                    self.adapter
                        .post_confirmation(c, &row.idempotency_key)
                        .await
                }
                Document::Reversal(r) => self.adapter.post_reversal(r, &row.idempotency_key).await,
            }
        };
        let result = match tokio::time::timeout(self.call_timeout, post.instrument(span)).await {
            Ok(r) => r,
            Err(_) => Err(AdapterError::Timeout(self.call_timeout.as_millis() as u64)),
        };
        metrics::histogram!("erp_call_duration_seconds", "call" => "post_confirmation")
            .record(started.elapsed().as_secs_f64());

        let (wait, after) = match result {
            Ok(posted) => {
                let state = self.on_result(true);
                outbound::mark_delivered(&self.pool, row.id).await?;
                let how = match posted {
                    Posted::New => "new",
                    Posted::AlreadyThere => "already_there",
                };
                match row.kind {
                    OutboxKind::Confirmation => {
                        metrics::counter!("erp_confirmations_delivered_total", "result" => how)
                            .increment(1);
                    }
                    OutboxKind::Reversal => {
                        metrics::counter!("erp_reversals_delivered_total", "result" => how)
                            .increment(1);
                    }
                }
                tracing::info!(idempotency_key = %row.idempotency_key, result = how,
                    kind = row.kind.as_str(), "delivered to the erp");
                (None, state)
            }
            Err(e) if !e.is_transient() => {
                // The ERP answered: the link is fine, this confirmation is not.
                let state = self.on_result(true);
                self.set_aside(&row, "rejected_by_erp", &e.to_string())
                    .await?;
                match row.kind {
                    OutboxKind::Confirmation => {
                        metrics::counter!("erp_confirmations_failed_total").increment(1);
                    }
                    OutboxKind::Reversal => {
                        metrics::counter!("erp_reversals_failed_total").increment(1);
                    }
                }
                tracing::error!(idempotency_key = %row.idempotency_key, error = %e,
                    kind = row.kind.as_str(), "erp refused it; set aside in the dead letters");
                (None, state)
            }
            Err(e) => {
                let state = self.on_result(false);
                let attempt = u32::try_from(row.attempts + 1).unwrap_or(u32::MAX);
                let delay = breaker::backoff(attempt, self.retry_initial, self.retry_max);
                let next = chrono::Utc::now()
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
                outbound::reschedule(&self.pool, row.id, next, &e.to_string()).await?;
                metrics::counter!("erp_delivery_failures_total").increment(1);
                tracing::warn!(idempotency_key = %row.idempotency_key, error = %e, attempt,
                    retry_in_ms = delay.as_millis() as u64, "confirmation delivery failed");
                (Some(delay), state)
            }
        };
        if after != during {
            tracing::info!(breaker = after.as_str(), "erp breaker changed");
            self.publish_breaker(after).await;
        }
        Ok(wait)
    }

    /// Takes a row out of the queue for good and records it as an outbound dead letter (the
    /// operator sees it in `GetStatus.dead_letters` and can replay it).
    async fn set_aside(&self, row: &OutboxRow, kind: &str, error: &str) -> Result<(), sqlx::Error> {
        outbound::mark_failed(&self.pool, row.id, error).await?;
        metrics::counter!("erp_dead_letters_total", "entity" => OUTBOX_ENTITY).increment(1);
        inbound::dead_letter(
            &self.pool,
            OUTBOX_ENTITY,
            &row.idempotency_key,
            kind,
            error,
            &row.payload,
        )
        .await
    }

    fn on_result(&self, ok: bool) -> State {
        match self.breaker.lock() {
            Ok(mut b) => {
                if ok {
                    b.on_success();
                } else {
                    b.on_failure(Instant::now());
                }
                b.state()
            }
            Err(_) => State::Closed,
        }
    }
}
